"""`train.engine=deepspeed`: a DeepSpeed ZeRO 1/2/3 engine built from our Hydra config (no
JSON file), with optional optimizer (and ZeRO-3 parameter) offload to CPU, and the step and
checkpoint helpers the trainer calls in place of the FSDP2 path.

How it fits the trainer:

- The model arrives parallelised from outside (sequence parallel, memory stack) and not
  sharded; DeepSpeed shards it over every rank (dp x sp ranks all hold the same weights,
  as with FSDP2). float32 / float64 runs keep the module in that dtype. model.dtype=bfloat16
  enables DeepSpeed's `bf16` section: the module computes in bf16, ZeRO keeps the float32
  master weights and optimizer state (`longtrain.distributed.precision`).
- The optimizer is ours (`longtrain.trainer.optimizer.build_optimizer`: AdamW, decay on
  matrices only) and so is the learning-rate schedule: the scheduler steps the client
  optimizer's groups, which ZeRO keeps.
- Gradient accumulation is ours: `managed_gradient_accumulation: false`, so each
  `backward` only accumulates and `step` is the boundary (reduce, clip, update, zero).
- The loss the trainer backpropagates is already divided by the global count of trained
  tokens; ZeRO averages gradients over its data-parallel world, so `backward` multiplies by
  the world size first (exact for powers of two; otherwise one rounding).
- The tiled loss reads the output projection's weight without calling its module, so under
  ZeRO-3 it is registered as an external parameter of the root module (gathered for the
  whole forward and backward of the model, as FSDP2's root group holds it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from longtrain.config import RunConfig
from longtrain.config.rules import check_deepspeed
from longtrain.errors import LongtrainError

STATE_MARKER = "deepspeed.json"  # rank 0 writes it once DeepSpeed's own files are saved
# In a checkpoint: its conversion to DeepSpeed's universal format (longtrain.convert.ds_universal),
# present only once complete.
UNIVERSAL_DIR = "universal"


# Measured here (DeepSpeed 0.19.8, float64, 4 -> 2 ranks; README, Resume): ZeRO-1 and 2
# resume from the universal format exactly (1 <-> 2 too); ZeRO-3 loads but its next step's
# loss is 4e-6 off the uninterrupted run's (its optimizer state is not restored as saved),
# and any change to or from ZeRO-3 fails inside DeepSpeed's loader.
ZERO3_UNIVERSAL_PROBLEM = (
    "DeepSpeed's universal format does not restore ZeRO-3 exactly (measured: the next "
    "step's loss 4e-6 off) and fails on a change to or from ZeRO-3"
)


class LayoutError(LongtrainError, ValueError):
    """A DeepSpeed checkpoint of another layout, not converted to the universal format."""


def largest_block_numel(model: nn.Module) -> int:
    """Parameters of the largest transformer block (sizes DeepSpeed's buckets)."""
    blocks = getattr(model, "layers", [])
    return max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)


def deepspeed_config(cfg: RunConfig, world_size: int, block_numel: int, on_cuda: bool) -> dict:
    """The DeepSpeed config dict for `cfg` on `world_size` ranks.

    Buckets and ZeRO-3 live parameters are sized from one block (`block_numel` elements):
    at most two blocks of gathered parameters at a time, reductions one block at a time;
    the planner assumes the same.
    """
    ds = cfg.train.deepspeed
    bucket = max(int(block_numel), 1 << 20)
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": on_cuda,  # no side streams to overlap with on CPU
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if ds.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": bucket,
                "stage3_max_live_parameters": 2 * bucket,
                "stage3_max_reuse_distance": 2 * bucket,
                "stage3_param_persistence_threshold": 0,  # shard even norm weights
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    precision = {}
    if cfg.model.dtype == "bfloat16":
        precision["bf16"] = {"enabled": True}
        if ds.zero_stage == 1 and not ds.offload_optimizer:
            # ZeRO-1's bf16 optimizer accumulates micro-batch gradients in float32.
            precision["data_types"] = {"grad_accum_dtype": "fp32"}
    return {
        **precision,
        "train_batch_size": world_size,  # nominal: batching is ours (see the module docstring)
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),  # 0: no clipping
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our AdamW also steps offloaded state
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedRun:
    """The engine plus what the trainer needs from it: backward, step, save, load.

    `engine` is the nn.Module to call for the forward (it runs the model with ZeRO's hooks).
    """

    def __init__(self, engine, world_size: int, zero_stage: int) -> None:
        self.engine = engine
        self.world_size = world_size
        self.zero_stage = zero_stage

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (already divided by the global token count)."""
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip, update and zero the gradients; returns the gradient norm before
        clipping (nan when DeepSpeed did not compute one). ZeRO skips the update when the
        gradients are not finite (`step_applied` then says False)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    @property
    def step_applied(self) -> bool:
        """Whether the latest `step` updated the parameters."""
        return bool(self.engine.was_step_applied())

    def _layout(self) -> dict:
        return {"world_size": self.world_size, "zero_stage": self.zero_stage}

    def save(self, path: Path) -> None:
        """Write model and optimizer state (every rank its partition) into directory `path`,
        then `STATE_MARKER` (from rank 0) naming the layout it needs."""
        path = Path(path)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
        if not dist.is_initialized() or dist.get_rank() == 0:
            (path / STATE_MARKER).write_text(json.dumps(self._layout()) + "\n")

    def load(self, path: Path) -> None:
        """Restore what `save` wrote at `path`. On the layout (world size, ZeRO stage) that
        wrote it, from DeepSpeed's partitioned files; on another, from the checkpoint's
        conversion to the universal format (`UNIVERSAL_DIR`, see
        `longtrain.convert.ds_universal`), and without one LayoutError names both layouts
        and the command that converts."""
        path = Path(path)
        marker = path / STATE_MARKER
        if not marker.is_file():
            raise ValueError(f"{path} is not a DeepSpeed checkpoint (no {STATE_MARKER})")
        saved = json.loads(marker.read_text())
        if saved == self._layout():
            self._load(path.parent, path.name)
            return
        if ZERO3_UNIVERSAL_PROBLEM and 3 in (saved["zero_stage"], self.zero_stage):
            raise LayoutError(
                f"{path} was saved by DeepSpeed with {_describe(saved)}; this run has "
                f"{_describe(self._layout())}: {ZERO3_UNIVERSAL_PROBLEM}. Resume on "
                f"{_describe(saved)}, or train with train.engine=fsdp2, whose checkpoints "
                "reshard to any layout"
            )
        if not (path / UNIVERSAL_DIR).is_dir():
            raise LayoutError(
                f"{path} was saved by DeepSpeed with {_describe(saved)}; this run has "
                f"{_describe(self._layout())}: its ZeRO partitions fit only the layout that "
                "wrote them. Convert it once to DeepSpeed's universal format, which loads on "
                f"any layout: python -m longtrain.convert.ds_universal {path} (then resume "
                "again); train.engine=fsdp2 checkpoints reshard as they are"
            )
        # DeepSpeed reads the switch from its config when loading; on only for this load,
        # so that the checkpoints this run saves are ordinary ones.
        config = self.engine._config
        config.load_universal_checkpoint = True
        try:
            self._load(path, UNIVERSAL_DIR)
        finally:
            config.load_universal_checkpoint = False

    def _load(self, load_dir: Path, tag: str) -> None:
        loaded, _ = self.engine.load_checkpoint(
            str(load_dir), tag=tag, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint to load at {load_dir / tag}")


def _describe(layout: dict) -> str:
    return f"{layout['world_size']} ranks at ZeRO-{layout['zero_stage']}"


def _skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU comm backend from compiling its shared-memory all-reduce op.

    On CPU, DeepSpeed's comm backend JIT-compiles `deepspeed_shm_comm` when it starts (45 s
    on 2 cores, measured, on every fresh TORCH_EXTENSIONS_DIR). The op serves only
    `inference_all_reduce`, which ZeRO training never calls: ZeRO's collectives go through
    torch.distributed. DeepSpeed keeps its op-compatibility table as one module-level dict
    so that edits to it persist; marking the op incompatible makes the backend skip it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_deepspeed(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, world_size: int
) -> DeepSpeedRun:
    """Wrap `model` and our `optimizer` in a DeepSpeed engine as `cfg.train.deepspeed` says.

    torch.distributed must already be initialised (torchrun or a test harness); DeepSpeed
    uses that process group as its data-parallel world.
    """
    check_deepspeed(cfg)
    import deepspeed

    if cfg.train.deepspeed.zero_stage == 3:
        deepspeed.zero.register_external_parameter(model, model.output_weight())
    on_cuda = next(model.parameters()).device.type == "cuda"
    if not on_cuda:
        _skip_cpu_shm_comm()
    config = deepspeed_config(cfg, world_size, largest_block_numel(model), on_cuda)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return DeepSpeedRun(engine, world_size, cfg.train.deepspeed.zero_stage)


__all__ = [
    "STATE_MARKER",
    "UNIVERSAL_DIR",
    "ZERO3_UNIVERSAL_PROBLEM",
    "LayoutError",
    "DeepSpeedRun",
    "build_deepspeed",
    "deepspeed_config",
    "largest_block_numel",
]
