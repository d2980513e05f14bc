"""Every rule a run config must obey, checked before any work starts, each in one place, with
a message that names the value and the fix.

`validate_run_config(cfg, world_size)` runs them all; the pieces that other layers apply to a
part of the config (`check_memory` in the memory stack, `check_deepspeed` when building the
engine) are the same functions. Rules about the mesh (degrees, heads, sequence length) belong
to `parallel.ParallelDims`, and the parallel methods to `parallel.check_method`: they are
called, not copied. `longtrain.check` adds the ones that need the degrees resolved for N
ranks, so launchers can run everything before a job starts.
"""

from __future__ import annotations

import math

import parallel
from longtrain.config.hf import check_seq_len
from longtrain.config.schema import (
    AC_MODES,
    CURRICULA,
    DTYPES,
    ENGINES,
    LOSS_WEIGHTINGS,
    PACKINGS,
    PLAN_DEVICES,
    SCHEDULES,
    TRAIN_ON,
    WANDB_MODES,
    ZERO_STAGES,
    MemoryConfig,
    PlanConfig,
    RunConfig,
    StageConfig,
)
from longtrain.errors import ConfigError


def _at_least(key: str, value: float, low: float, meaning: str = "") -> None:
    if not value >= low:  # also refuses nan
        raise ConfigError(f"{key}={value} must be >= {low}{meaning}")


def _one_of(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; expected one of {', '.join(map(str, choices))}")


def _offload_value(value) -> bool | int | float:
    """`train.memory.offload_activations` as a bool, an int >= 0 or a float in [0, 1]."""
    key = "train.memory.offload_activations"
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        _at_least(key, value, 0, " (a count of blocks)")
        return value
    if isinstance(value, float):
        if not 0 <= value <= 1:  # also refuses nan
            raise ConfigError(f"{key}={value} must be a fraction of the blocks in [0, 1]")
        return value
    raise ConfigError(
        f"{key}={value!r}; expected true, false, a count of blocks (int) or a fraction (float)"
    )


def offloaded_blocks(m: MemoryConfig, n_layers: int) -> int:
    """How many blocks offload their checkpointed inputs (the first ones): true every block,
    false none, an int that many, a float that fraction of `n_layers` rounded to the nearest
    count, halves up. Raises ConfigError for a count above `n_layers`."""
    value = _offload_value(m.offload_activations)
    if isinstance(value, bool):
        return n_layers if value else 0
    if isinstance(value, float):
        return math.floor(value * n_layers + 0.5)
    if value > n_layers:
        raise ConfigError(
            f"train.memory.offload_activations={value} is above the model's {n_layers} blocks "
            f"(use at most {n_layers}, or true for every block)"
        )
    return value


def check_memory(m: MemoryConfig, n_layers: int | None = None) -> None:
    """The memory stack (`train.memory`); with `n_layers`, also the offload count."""
    _one_of("train.memory.activation_checkpoint", m.activation_checkpoint, AC_MODES)
    value = _offload_value(m.offload_activations)
    if value and m.activation_checkpoint == "none":
        raise ConfigError(
            f"train.memory.offload_activations={value} offloads the inputs that activation "
            "checkpointing keeps: set train.memory.activation_checkpoint=full or selective"
        )
    if n_layers is not None:
        offloaded_blocks(m, n_layers)
    _at_least("train.memory.mlp_tiles", m.mlp_tiles, 0, " (0: from the budget)")
    if m.mlp_tiles == 0 and m.mlp_tile_budget_mib <= 0:
        raise ConfigError(
            f"train.memory.mlp_tile_budget_mib={m.mlp_tile_budget_mib} must be > 0 with "
            "mlp_tiles=0 (tiles from the budget)"
        )
    _at_least("train.memory.loss_tile_tokens", m.loss_tile_tokens, 1)


def check_deepspeed(cfg: RunConfig) -> None:
    """train.engine=deepspeed: the ZeRO section and the switches it replaces."""
    ds = cfg.train.deepspeed
    _one_of("train.deepspeed.zero_stage", ds.zero_stage, ZERO_STAGES)
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError(
            f"train.deepspeed.offload_params=true needs zero_stage=3 (got {ds.zero_stage}): "
            "only ZeRO-3 partitions parameters"
        )
    if cfg.train.memory.cpu_offload:
        raise ConfigError(
            "train.memory.cpu_offload is the FSDP2 switch; with train.engine=deepspeed use "
            "train.deepspeed.offload_optimizer / offload_params"
        )


def check_global_batch(global_batch: int, dp_size: int) -> None:
    """Each data-parallel rank takes an equal share of the sequences of a step."""
    if global_batch % dp_size:
        raise ConfigError(
            f"train.global_batch ({global_batch}) must be divisible by the "
            f"data-parallel size ({dp_size}); use a multiple of {dp_size}"
        )


# The kernels a plan may assume (`plan.attn_backend`, `plan.kernel_backend`).
PLAN_ATTN_BACKENDS = ("flash_attn", "torch_varlen", "triton", "torch")
PLAN_KERNEL_BACKENDS = ("triton", "torch")


def check_node_layout(world_size: int, gpus_per_node: int) -> None:
    """A run fills whole nodes, or fits in one (whose host memory its GPUs share)."""
    if world_size > gpus_per_node and world_size % gpus_per_node:
        raise ConfigError(
            f"plan.gpus_per_node={gpus_per_node} does not divide the world size {world_size}: "
            f"plan whole nodes (a multiple of {gpus_per_node} GPUs) or set plan.gpus_per_node"
        )


def check_plan(plan: PlanConfig) -> None:
    """The `plan` group of `python -m longtrain.plan`."""
    _one_of("plan.device", plan.device, PLAN_DEVICES)
    _at_least("plan.world_size", plan.world_size, 0, " (0: ulysses x ring)")
    if not plan.gpu_mem_gib > 0:
        raise ConfigError(f"plan.gpu_mem_gib={plan.gpu_mem_gib} must be > 0")
    _at_least("plan.reserve_gib", plan.reserve_gib, 0)
    _at_least("plan.seq_len_step", plan.seq_len_step, 1)
    _at_least("plan.max_seq_len", plan.max_seq_len, 2)
    if not plan.host_mem_gib > 0:  # also refuses nan
        raise ConfigError(
            f"plan.host_mem_gib={plan.host_mem_gib:g} must be > 0 (the host memory of a node)"
        )
    _at_least("plan.gpus_per_node", plan.gpus_per_node, 1)
    if plan.world_size:
        check_node_layout(plan.world_size, plan.gpus_per_node)
    _one_of("plan.attn_backend", plan.attn_backend, PLAN_ATTN_BACKENDS)
    _one_of("plan.kernel_backend", plan.kernel_backend, PLAN_KERNEL_BACKENDS)


def _check_parallel(cfg: RunConfig) -> None:
    p = cfg.parallel
    try:
        parallel.check_method(p.method, p.ring_impl)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if p.adaptive and p.method == "none":
        raise ConfigError(
            "parallel.adaptive=true needs sequence parallelism: pick parallel=ulysses, ring, "
            "usp or auto"
        )
    if p.method == "auto" and p.ulysses != 1:
        raise ConfigError(
            f"parallel=auto takes its ranks from parallel.ring (0: every rank), got "
            f"parallel.ulysses={p.ulysses}: leave it at 1"
        )
    _at_least("parallel.adaptive_threshold", p.adaptive_threshold, 0, " (0: the cost model)")
    if not p.adaptive_slack >= 0:
        raise ConfigError(f"parallel.adaptive_slack={p.adaptive_slack:g} must be >= 0")
    for key in ("cost_tflops", "cost_link_gbps", "calibrate_timeout_s"):
        if not getattr(p, key) > 0:  # also refuses nan
            raise ConfigError(f"parallel.{key}={getattr(p, key):g} must be > 0")
    if not p.cost_latency_us >= 0:
        raise ConfigError(f"parallel.cost_latency_us={p.cost_latency_us:g} must be >= 0")


def _check_train(cfg: RunConfig) -> None:
    t = cfg.train
    _at_least("train.steps", t.steps, 0)
    _at_least("train.global_batch", t.global_batch, 1)
    _at_least("train.micro_batch", t.micro_batch, 0, " (0: the whole batch in one forward)")
    _at_least("train.ckpt_every", t.ckpt_every, 0, " (0: only the final checkpoint)")
    _at_least("train.keep_last", t.keep_last, 0, " (0: keep every checkpoint)")
    _at_least("train.log_every", t.log_every, 1)
    _at_least("train.peak_tflops", t.peak_tflops, 0)
    _at_least("train.dist_timeout_s", t.dist_timeout_s, 1)
    _at_least("train.heartbeat_s", t.heartbeat_s, 0, " (0: off)")
    _at_least("train.hang_timeout_s", t.hang_timeout_s, 0, " (0: off)")
    _one_of("train.engine", t.engine, ENGINES)
    if t.resume not in ("none", "auto") and not t.resume:
        raise ConfigError("train.resume must be none, auto or a checkpoint directory")
    check_memory(t.memory)
    if t.engine == "deepspeed":
        check_deepspeed(cfg)
        if t.ckpt_async:
            raise ConfigError(
                "train.ckpt_async=true needs train.engine=fsdp2 or none: DeepSpeed writes its "
                "own checkpoints, synchronously"
            )


def _check_optim(cfg: RunConfig) -> None:
    o = cfg.optim
    _one_of("optim.name", o.name, ("adamw",))
    _at_least("optim.lr", o.lr, 0)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _at_least("optim.eps", o.eps, 0)
    _at_least("optim.weight_decay", o.weight_decay, 0)
    if o.grad_clip is not None and not o.grad_clip >= 0:
        raise ConfigError(
            f"optim.grad_clip={o.grad_clip} must be >= 0; to turn clipping off use 0 or null"
        )


def _check_stage(k: int, st: StageConfig) -> None:
    key = f"data.stages[{k}]"
    _at_least(f"{key}.steps", st.steps, 1)
    _at_least(f"{key}.seq_len", st.seq_len, 2, " (one input and one label)")
    _at_least(f"{key}.global_batch", st.global_batch, 0, " (0: keep the tokens per step)")
    if not (st.rope_theta > 0 and math.isfinite(st.rope_theta)):
        raise ConfigError(f"{key}.rope_theta={st.rope_theta} must be a positive number")


def _check_data(cfg: RunConfig) -> None:
    d = cfg.data
    _at_least("data.seq_len", d.seq_len, 2, " (a sequence needs one input and one label)")
    _one_of("data.packing", d.packing, PACKINGS)
    _one_of("data.curriculum", d.curriculum, CURRICULA)
    _at_least("data.curriculum_cycles", d.curriculum_cycles, 1)
    _at_least("data.min_log2", d.min_log2, 0)
    _at_least("data.max_log2", d.max_log2, 0, " (0: log2 of data.seq_len)")
    if d.max_log2 and d.max_log2 < d.min_log2:
        raise ConfigError(f"data.max_log2={d.max_log2} is below data.min_log2={d.min_log2}")
    _at_least("data.limit_docs", d.limit_docs, 0, " (0: every document)")
    _at_least("data.prefetch", d.prefetch, 0, " (0: no background thread)")
    _one_of("data.loss_weighting", d.loss_weighting, LOSS_WEIGHTINGS)
    _one_of("data.train_on", d.train_on, TRAIN_ON)
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    _at_least("train.eval_every", cfg.train.eval_every, 0, " (0: no evaluation)")
    _at_least("train.eval_sequences", cfg.train.eval_sequences, 0, " (0: train.global_batch)")
    if cfg.train.eval_every and not (d.val_fraction or d.val_source):
        raise ConfigError(
            f"train.eval_every={cfg.train.eval_every} needs held-out documents: set "
            "data.val_fraction (e.g. 0.05) or data.val_source"
        )
    if d.val_fraction and d.val_source:
        raise ConfigError("data.val_fraction and data.val_source: name one of them")
    if not d.store_dir:
        raise ConfigError("data.store_dir is empty: name the token store directory")
    for k, st in enumerate(d.stages):
        _check_stage(k, st)
    _check_schedule(cfg)


def stage_batch(st: StageConfig, tokens_per_step: int) -> int:
    """Sequences per step of a context-length stage: its own global_batch, or as many as keep
    `tokens_per_step` tokens (`_check_schedule` checks that they divide)."""
    return st.global_batch or tokens_per_step // st.seq_len


def _check_schedule(cfg: RunConfig) -> None:
    """What the packing needs of the sequence lengths and the tokens per step."""
    d = cfg.data
    tokens_per_step = cfg.train.global_batch * d.seq_len
    if d.stages and d.packing == "decomposition":
        raise ConfigError("data.stages needs a fixed-length packing (best_fit, concat_chunk)")
    for k, st in enumerate(d.stages):
        batch = stage_batch(st, tokens_per_step)
        if batch < 1 or (not st.global_batch and tokens_per_step % st.seq_len):
            raise ConfigError(
                f"data.stages[{k}]: seq_len {st.seq_len} does not divide the "
                f"{tokens_per_step} tokens per step; set data.stages[{k}].global_batch"
            )
    if d.packing == "decomposition" and d.max_log2 == 0 and d.seq_len & (d.seq_len - 1):
        raise ConfigError(
            f"packing=decomposition needs data.seq_len a power of two (got {d.seq_len}) "
            "or an explicit data.max_log2"
        )


def validate_run_config(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigError (a ValueError) on the first setting that cannot work on
    `world_size` ranks."""
    _check_data(cfg)
    _check_train(cfg)
    _check_optim(cfg)
    _one_of("model.dtype", cfg.model.dtype, DTYPES)
    _check_parallel(cfg)
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    if cfg.parallel.method == "none":  # every rank is a data-parallel rank
        check_global_batch(cfg.train.global_batch, max(1, world_size))
    if cfg.model.name == "hf":  # reads config.json (transformers)
        check_seq_len(cfg.model, cfg.data.seq_len)


__all__ = [
    "check_deepspeed",
    "check_global_batch",
    "check_memory",
    "check_node_layout",
    "check_plan",
    "offloaded_blocks",
    "stage_batch",
    "validate_run_config",
]
