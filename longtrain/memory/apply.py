"""Apply the memory stack (`train.memory`) to a model from outside, in place:

    tiled MLP (each block's MLP) -> tiled-loss tile size -> activation checkpointing (+ offload)

Call it after sequence parallelism and before compile / FSDP2 / DeepSpeed (torchtitan's
order: sequence parallel -> activation checkpointing -> compile -> sharding). The model file
does not change; blocks and MLPs keep their parameter names (see `tile_mlp`,
`checkpoint_block`), so checkpoints load whatever the memory settings.
"""

from __future__ import annotations

from torch import nn

from longtrain.config import MemoryConfig
from longtrain.memory.checkpointing import AC_MODES, ActivationOffloader, checkpoint_block
from longtrain.memory.tiled_mlp import tile_mlp


def validate_memory_config(cfg: MemoryConfig) -> None:
    """Raise ValueError naming the setting and the fix."""
    if cfg.activation_checkpoint not in AC_MODES:
        raise ValueError(
            f"train.memory.activation_checkpoint={cfg.activation_checkpoint!r}; "
            f"expected one of {AC_MODES}"
        )
    if cfg.offload_activations and cfg.activation_checkpoint == "none":
        raise ValueError(
            "train.memory.offload_activations=true offloads the inputs that activation "
            "checkpointing keeps: set train.memory.activation_checkpoint=full or selective"
        )
    if cfg.mlp_tiles < 0:
        raise ValueError(f"train.memory.mlp_tiles={cfg.mlp_tiles} must be >= 0 (0: from budget)")
    if cfg.mlp_tiles == 0 and cfg.mlp_tile_budget_mib <= 0:
        raise ValueError(
            f"train.memory.mlp_tile_budget_mib={cfg.mlp_tile_budget_mib} must be > 0 with "
            "mlp_tiles=0 (tiles from the budget)"
        )
    if cfg.loss_tile_tokens < 1:
        raise ValueError(f"train.memory.loss_tile_tokens={cfg.loss_tile_tokens} must be >= 1")


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"apply_memory needs a model with a `layers` ModuleList of blocks; "
            f"{type(model).__name__} has none"
        )
    return layers


def apply_memory(
    model: nn.Module, cfg: MemoryConfig, *, offload_device: str = "cpu"
) -> ActivationOffloader | None:
    """Apply `cfg` to `model` (a `longtrain.model.Transformer`, possibly sequence-parallel) in
    place. Returns the activation offloader (None without offload).

    offload_device: where offloaded block inputs wait ("cpu"; the planner passes "meta").
    """
    validate_memory_config(cfg)
    blocks = _blocks(model)
    if cfg.mlp_tiles != 1:
        ffn_dim = model.cfg.ffn_dim
        for block in blocks:
            tile_mlp(block.mlp, cfg.mlp_tiles, cfg.mlp_tile_budget_mib, ffn_dim)
    # Read by the model's forward when it calls kernels.loss.linear_cross_entropy.
    model.loss_tile_tokens = cfg.loss_tile_tokens
    offloader = None
    if cfg.activation_checkpoint != "none":
        offloader = ActivationOffloader(offload_device) if cfg.offload_activations else None
        for block in blocks:
            checkpoint_block(block, cfg.activation_checkpoint, offloader)
    return offloader


__all__ = ["apply_memory", "validate_memory_config"]
