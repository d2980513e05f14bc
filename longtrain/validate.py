"""Checks of a run config that must fail before any work starts, with a message that names
the value and the fix. (Mesh and head divisibility live in `parallel.ParallelDims`.)"""

from __future__ import annotations

from longtrain.config import RunConfig
from longtrain.engines.deepspeed_engine import validate_deepspeed_config
from longtrain.memory import validate_memory_config

DTYPES = ("float32", "bfloat16", "float64")
METHODS = ("none", "ulysses", "ring", "usp")


def validate_run_config(cfg: RunConfig, world_size: int) -> None:
    """Raise ValueError on the first setting that cannot work."""
    if cfg.data.seq_len < 2:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len}: a sequence needs at least 2 tokens "
            "(one input and one label)"
        )
    if cfg.train.steps < 0:
        raise ValueError(f"train.steps={cfg.train.steps} must be >= 0")
    if cfg.train.global_batch < 1:
        raise ValueError(f"train.global_batch={cfg.train.global_batch} must be >= 1")
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.model.dtype!r}; expected one of {DTYPES}")
    if cfg.parallel.method not in METHODS:
        raise ValueError(f"parallel.method={cfg.parallel.method!r}; expected one of {METHODS}")
    if cfg.parallel.ring_impl not in ("zigzag", "allgather"):
        raise ValueError(
            f"parallel.ring_impl={cfg.parallel.ring_impl!r}; expected zigzag or allgather"
        )
    if cfg.data.loss_weighting not in ("token", "per_document"):
        raise ValueError(
            f"data.loss_weighting={cfg.data.loss_weighting!r}; expected token or per_document"
        )
    if cfg.train.engine not in ("fsdp2", "deepspeed", "none"):
        raise ValueError(f"train.engine={cfg.train.engine!r}; expected fsdp2, deepspeed or none")
    validate_memory_config(cfg.train.memory)
    if cfg.train.engine == "deepspeed":
        validate_deepspeed_config(cfg)
    if cfg.train.resume not in ("none", "auto") and not cfg.train.resume:
        raise ValueError("train.resume must be none, auto or a checkpoint directory")
    if cfg.logging.wandb.mode not in ("disabled", "offline", "online"):
        raise ValueError(
            f"logging.wandb.mode={cfg.logging.wandb.mode!r}; expected disabled, offline or online"
        )
    if cfg.model.name == "hf":
        from longtrain.model.hf import check_seq_len

        check_seq_len(cfg.model, cfg.data.seq_len)
    if cfg.train.global_batch % max(1, world_size) and cfg.parallel.method == "none":
        raise ValueError(
            f"world size {world_size} does not divide train.global_batch="
            f"{cfg.train.global_batch}; use a multiple of {world_size}"
        )
