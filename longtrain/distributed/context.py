"""What a training step needs besides the model, as `parallelize` set it up."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """What a step needs besides the model: groups, sharding and numerics."""

    device: torch.device
    dtype: str  # float32 | bfloat16 | float64
    grad_clip: float | None  # max global grad norm; 0 or None: no clipping
    pad_id: int
    autocast: bool = False  # bf16 autocast over float32 parameters (distributed.precision)
    dims: object | None = None  # parallel.ParallelDims when sequence parallel
    parallel_cfg: object | None = None
    dp_group: object | None = None  # process group over which batches differ
    world_group: object | None = None  # process group over which local loss sums add up
    sync_grads_manually: bool = False  # world > 1 without a sharded engine
    engine: object | None = None  # a DeepSpeedRun (train.engine=deepspeed): backward and update
    # parallel.AdaptivePolicy when short documents stay whole on one rank (parallel=auto or
    # parallel.adaptive=true): shard_micro_batch asks it, per micro-batch, for the layout.
    sp_policy: object | None = None


__all__ = ["StepContext"]
