"""Apply parallelism to a model from outside, in torchtitan's fixed order:

    sequence parallel (swap attention) -> activation checkpointing -> compile -> FSDP2

The model file never mentions ranks; everything here wraps or swaps its modules.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

import parallel
from longtrain.config import RunConfig
from longtrain.distributed import DistEnv
from longtrain.memory import apply_memory
from longtrain.step import StepContext


def resolve_degrees(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(ulysses, ring) with 0 meaning "every rank the other degree leaves"."""
    p = cfg.parallel
    if p.method == "none":
        return 1, 1
    ulysses = p.ulysses if p.method in ("ulysses", "usp") else 1
    ring = p.ring if p.method in ("ring", "usp") else 1
    if ulysses == 0 and ring == 0:
        raise ValueError("parallel.ulysses and parallel.ring cannot both be 0 (auto)")
    if ulysses == 0:
        ulysses = max(1, world_size // ring)
    if ring == 0:
        ring = max(1, world_size // ulysses)
    return ulysses, ring


def build_parallel_dims(cfg: RunConfig, env: DistEnv):
    """The `parallel.ParallelDims` of this run, validated against the model and sequence
    length before any work starts; None for a single process without sequence parallelism."""
    if env.world_size == 1 and cfg.parallel.method == "none":
        return None
    ulysses, ring = resolve_degrees(cfg, env.world_size)
    dims = parallel.ParallelDims(env.world_size, ulysses=ulysses, ring=ring)
    dims.validate(cfg.model.n_heads, cfg.model.n_kv_heads, cfg.data.seq_len)
    dims.build_mesh(env.device.type)
    return dims


def describe_layout(cfg: RunConfig, env: DistEnv, dims) -> str:
    """One line a person reads first: the whole grid."""
    if dims is None:
        return "layout: 1 process (dp=1 x ulysses=1 x ring=1)"
    return (
        f"layout: {env.world_size} processes = dp={dims.dp} x ulysses={dims.ulysses} x "
        f"ring={dims.ring} (parallel={cfg.parallel.method}"
        + (f", ring_impl={cfg.parallel.ring_impl}" if dims.ring > 1 else "")
        + f"), engine={cfg.train.engine if env.world_size > 1 else 'none'}"
    )


def parallelize(model: nn.Module, dims, cfg: RunConfig, env: DistEnv, pad_id: int):
    """Apply the configured parallelism to `model` in place; returns (model, StepContext).

    `pad_id` fills the padding that sequence-parallel sharding adds (never trained on)."""
    sp = dims is not None and dims.sp_size > 1
    # 1. Sequence parallelism: swap every VarlenAttention for its sequence-parallel version.
    if sp:
        parallel.apply(model, dims, cfg.parallel)
    # 2. The memory stack (train.memory): tiled MLP, loss tile size, activation
    #    checkpointing with offload of the checkpointed block inputs.
    apply_memory(model, cfg.train.memory)
    # 3. Compile each block, so graph breaks stay local.
    if cfg.train.compile:
        for block in model.layers:
            block.compile()
    # 4. FSDP2 over every rank: dp x sp ranks all hold replicas of the same weights.
    fsdp = env.world_size > 1 and cfg.train.engine == "fsdp2"
    if fsdp:
        _apply_fsdp2(model, env, cfg.model.dtype, cfg.train.memory.cpu_offload)
    ctx = StepContext(
        device=env.device,
        dtype=cfg.model.dtype,
        grad_clip=cfg.optim.grad_clip,
        pad_id=pad_id,
        dims=dims if sp else None,
        parallel_cfg=cfg.parallel,
        dp_group=dims.dp_group if dims is not None else None,
        world_group=None,
        sync_grads_manually=env.world_size > 1 and cfg.train.engine == "none",
    )
    return model, ctx


def _apply_fsdp2(model: nn.Module, env: DistEnv, dtype: str, cpu_offload: bool = False) -> None:
    mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("fsdp",))
    # bf16 compute comes from autocast; gradients reduce in the parameters' dtype (fp32/fp64).
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None)
    # cpu_offload: sharded parameters, gradients and optimizer state live on the host.
    offload = (
        CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if cpu_offload else OffloadPolicy()
    )
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The loss is already divided by the global token count: sum, do not average.
            # Plain SUM also keeps gloo working (it has no PREMUL_SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


__all__ = ["build_parallel_dims", "describe_layout", "parallelize", "resolve_degrees"]
