"""The `plan` config group: what the planner plans for (`python -m longtrain.plan`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlanConfig:
    gpu_mem_gib: float = 80.0  # memory of one GPU, GiB; the plan must fit in it
    reserve_gib: float = 2.0  # kept free of tensors: CUDA context, NCCL, allocator slack
    world_size: int = 0  # GPUs of the planned run; 0: ulysses x ring (data parallel 1)
    device: str = "cuda"  # cuda: GPU kernels' workspaces | cpu: our CPU kernels' (validation)
    search: bool = True  # also find the longest data.seq_len that fits (max_seq_len)
    seq_len_step: int = 1024  # granularity of max_seq_len (rounded to the layout's multiple)
    max_seq_len: int = 1 << 26  # upper end of the search


__all__ = ["PlanConfig"]
