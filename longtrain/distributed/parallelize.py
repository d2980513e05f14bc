"""Apply parallelism to a model from outside, in torchtitan's fixed order:

    (bf16 embedding cast) -> sequence parallel (swap attention) -> activation checkpointing
    -> compile -> FSDP2 (bf16 gathers, float32 reductions for model.dtype=bfloat16)

The model file never mentions ranks; everything here wraps or swaps its modules.
"""

from __future__ import annotations

from torch import nn

import parallel
from longtrain.config import RunConfig
from longtrain.distributed.context import StepContext
from longtrain.distributed.env import DistEnv
from longtrain.distributed.fsdp2 import apply_fsdp2
from longtrain.distributed.memory import apply_memory
from longtrain.distributed.precision import (
    cast_embedding_output,
    cast_linear_weights_in_op,
    compute_dtype,
    uses_autocast,
)


def resolve_degrees(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(ulysses, ring) with 0 meaning "every rank the other degree leaves"."""
    p = cfg.parallel
    if p.method == "none":
        return 1, 1
    ulysses = p.ulysses if p.method in ("ulysses", "usp") else 1
    ring = p.ring if p.method in ("ring", "usp", "auto") else 1
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
    if cfg.parallel.method == "auto":  # Ulysses over the same ranks, where the heads allow
        dims.alternate = ulysses_view(cfg, dims)
        if dims.alternate is not None:
            dims.alternate.build_mesh(env.device.type)
    return dims


def ulysses_view(cfg: RunConfig, dims):
    """parallel=auto's Ulysses grid over the ring's SP ranks (same dp, ulysses = ring), or
    None when the model's heads cannot be split over that many ranks."""
    view = parallel.ParallelDims(dims.world_size, ulysses=dims.ring, ring=1)
    try:
        view.validate(cfg.model.n_heads, cfg.model.n_kv_heads, None)
    except ValueError:
        return None
    return view


def adaptive_placement(cfg: RunConfig) -> bool:
    """Whether the run places short documents whole on one rank (parallel/adaptive.py)."""
    return cfg.parallel.method == "auto" or (
        cfg.parallel.adaptive and cfg.parallel.method != "none"
    )


def describe_layout(cfg: RunConfig, env: DistEnv, dims) -> str:
    """One line a person reads first: the whole grid."""
    if dims is None:
        return "layout: 1 process (dp=1 x ulysses=1 x ring=1)"
    return (
        f"layout: {env.world_size} processes = dp={dims.dp} x ulysses={dims.ulysses} x "
        f"ring={dims.ring} (parallel={cfg.parallel.method}"
        + (f", ring_impl={cfg.parallel.ring_impl}" if dims.ring > 1 else "")
        + (", adaptive placement" if adaptive_placement(cfg) else "")
        + f"), engine={cfg.train.engine if env.world_size > 1 else 'none'}"
    )


def apply_model_stack(model: nn.Module, dims, cfg: RunConfig, offload_device: str = "cpu") -> None:
    """Steps 0-2 of `parallelize`, in place: the bf16 embedding cast, sequence parallelism and
    the memory stack. The planner runs exactly this on its fake model (compile changes no
    saved state; the engine's state it models apart).

    `offload_device`: where offloaded block inputs wait ("cpu", pinned on CUDA; the planner
    passes "meta": host memory it counts apart)."""
    # 0. bf16 autocast runs: the residual stream starts in bf16 and linear layers keep no cast
    #    weight copies for the backward (longtrain.distributed.precision).
    if cfg.model.dtype == "bfloat16":
        cast_embedding_output(model)
        cast_linear_weights_in_op(model)
    # 1. Sequence parallelism: swap every VarlenAttention for its sequence-parallel version.
    if dims is not None and dims.sp_size > 1:
        parallel.apply(model, dims, cfg.parallel)
    # 2. The memory stack (train.memory): tiled MLP, loss tile size, activation
    #    checkpointing with offload of the checkpointed block inputs.
    apply_memory(model, cfg.train.memory, offload_device=offload_device)


def step_context(cfg: RunConfig, env: DistEnv, dims, pad_id: int) -> StepContext:
    """What a training step of this layout needs besides the model (the planner's too)."""
    sp = dims is not None and dims.sp_size > 1
    return StepContext(
        device=env.device,
        dtype=cfg.model.dtype,
        autocast=uses_autocast(cfg.model.dtype, cfg.train.engine, env.world_size),
        grad_clip=cfg.optim.grad_clip,
        pad_id=pad_id,
        dims=dims if sp else None,
        parallel_cfg=cfg.parallel,
        dp_group=dims.dp_group if dims is not None else None,
        world_group=None,
        sync_grads_manually=env.world_size > 1 and cfg.train.engine == "none",
        sp_policy=adaptive_policy(cfg, dims) if sp and adaptive_placement(cfg) else None,
    )


def adaptive_policy(cfg: RunConfig, dims) -> parallel.AdaptivePolicy:
    """The per-micro-batch placement policy of this run, its cost model from the model's
    shapes and `parallel.cost_*` (start-up calibration may replace it: trainer.loop)."""
    p, m = cfg.parallel, cfg.model
    head_dim = m.head_dim or m.dim // m.n_heads
    methods = [parallel.SplitMethod(p.method, dims.ring, dims.ulysses, p.ring_impl)]
    if p.method == "auto":
        P = dims.sp_size
        methods = [parallel.SplitMethod("ring", P, 1, "zigzag")]
        if dims.alternate is not None:
            methods.append(parallel.SplitMethod("ulysses", 1, P))
        methods.append(parallel.SplitMethod("ring_allgather", P, 1, "allgather"))
    model = parallel.SPCostModel.analytic(
        m.n_heads, m.n_kv_heads, head_dim, m.dim, m.ffn_dim, p.cost_tflops, p.cost_link_gbps,
        p.cost_latency_us,
    )  # fmt: skip
    shape = parallel.AttnShape(m.n_heads, m.n_kv_heads, head_dim, compute_dtype(m.dtype))
    return parallel.AdaptivePolicy(
        methods, shape, model, m.n_layers, p.adaptive_threshold, p.adaptive_slack
    )


def parallelize(model: nn.Module, dims, cfg: RunConfig, env: DistEnv, pad_id: int):
    """Apply the configured parallelism to `model` in place; returns (model, StepContext).

    `pad_id` fills the padding that sequence-parallel sharding adds (never trained on)."""
    apply_model_stack(model, dims, cfg)  # steps 0-2
    # 3. Compile each block, so graph breaks stay local.
    if cfg.train.compile:
        for block in model.layers:
            block.compile()
    # 4. FSDP2 over every rank: dp x sp ranks all hold replicas of the same weights.
    if env.world_size > 1 and cfg.train.engine == "fsdp2":
        apply_fsdp2(model, env, cfg.train.memory.cpu_offload, cfg.model.dtype)
    return model, step_context(cfg, env, dims, pad_id)


__all__ = [
    "apply_model_stack",
    "build_parallel_dims",
    "describe_layout",
    "parallelize",
    "resolve_degrees",
    "step_context",
]
