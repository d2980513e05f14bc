"""Checks of a run config that must fail before any work starts, with a message that names
the value and the fix. (Mesh and head divisibility live in `parallel.ParallelDims`.)

`longtrain.check` runs these and every other check that needs neither data nor processes;
the launchers call it (`python -m longtrain.check`) so that a bad value is one line before a
job starts, not a crash retried by torchrun.
"""

from __future__ import annotations

import math

from longtrain.config import RunConfig, StageConfig
from longtrain.data.curriculum import CURRICULA
from longtrain.engines.deepspeed_engine import validate_deepspeed_config
from longtrain.errors import ConfigError
from longtrain.memory import validate_memory_config

DTYPES = ("float32", "bfloat16", "float64")
METHODS = ("none", "ulysses", "ring", "usp")
PACKINGS = ("concat_chunk", "best_fit", "decomposition")
SCHEDULES = ("cosine", "constant")


def _at_least(key: str, value: float, low: float, meaning: str = "") -> None:
    if not value >= low:  # also refuses nan
        raise ConfigError(f"{key}={value} must be >= {low}{meaning}")


def _one_of(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}; expected one of {', '.join(map(str, choices))}")


def _check_train(cfg: RunConfig, world_size: int) -> None:
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
    _one_of("train.engine", t.engine, ("fsdp2", "deepspeed", "none"))
    if t.resume not in ("none", "auto") and not t.resume:
        raise ConfigError("train.resume must be none, auto or a checkpoint directory")
    validate_memory_config(t.memory)
    if t.engine == "deepspeed":
        validate_deepspeed_config(cfg)
    if t.global_batch % max(1, world_size) and cfg.parallel.method == "none":
        raise ConfigError(
            f"world size {world_size} does not divide train.global_batch="
            f"{t.global_batch}; use a multiple of {world_size}"
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
    _one_of("data.loss_weighting", d.loss_weighting, ("token", "per_document"))
    if not d.store_dir:
        raise ConfigError("data.store_dir is empty: name the token store directory")
    for k, st in enumerate(d.stages):
        _check_stage(k, st)


def validate_run_config(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigError (a ValueError) on the first setting that cannot work."""
    _check_data(cfg)
    _check_train(cfg, world_size)
    _check_optim(cfg)
    _one_of("model.dtype", cfg.model.dtype, DTYPES)
    _one_of("parallel.method", cfg.parallel.method, METHODS)
    _one_of("parallel.ring_impl", cfg.parallel.ring_impl, ("zigzag", "allgather"))
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("disabled", "offline", "online"))
    if cfg.model.name == "hf":
        from longtrain.model.hf import check_seq_len

        check_seq_len(cfg.model, cfg.data.seq_len)


__all__ = ["DTYPES", "METHODS", "PACKINGS", "SCHEDULES", "validate_run_config"]
