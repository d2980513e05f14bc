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
from longtrain.config.rules import check_memory, offloaded_blocks
from longtrain.distributed.memory.checkpointing import ActivationOffloader, checkpoint_block
from longtrain.distributed.memory.tiled_mlp import tile_mlp


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

    Checkpointing covers every block; of those, the first `offloaded_blocks(cfg, n)` offload
    their inputs (`train.memory.offload_activations`: a count, a fraction or all), the rest
    keep them on the device.

    offload_device: where offloaded block inputs wait ("cpu"; the planner passes "meta").
    """
    blocks = _blocks(model)
    check_memory(cfg, len(blocks))
    if cfg.mlp_tiles != 1:
        ffn_dim = model.cfg.ffn_dim
        for block in blocks:
            tile_mlp(block.mlp, cfg.mlp_tiles, cfg.mlp_tile_budget_mib, ffn_dim)
    # Read by the model's forward when it calls kernels.loss.linear_cross_entropy.
    model.loss_tile_tokens = cfg.loss_tile_tokens
    offloader = None
    if cfg.activation_checkpoint != "none":
        n_offloaded = offloaded_blocks(cfg, len(blocks))
        offloader = ActivationOffloader(offload_device) if n_offloaded else None
        for i, block in enumerate(blocks):
            checkpoint_block(
                block, cfg.activation_checkpoint, offloader if i < n_offloaded else None
            )
    return offloader


__all__ = ["apply_memory"]
