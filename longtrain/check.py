"""`python -m longtrain.check --world-size N [overrides...]`: will this config start on N ranks?

Composes the config exactly as `python -m longtrain.train [overrides...]` would (same config
tree, `experiment=...`, Hydra's own errors, `+key=` refused by `to_run_config`) and runs every
check that needs neither data nor processes: the run config (`validate_run_config`), the
parallel degrees and the grid against the model's heads and the sequence length
(`ParallelDims.validate`), the model's shapes, and the data-parallel share of the batch.

    $ python -m longtrain.check --world-size 8 experiment=demo_cpu parallel.ulysses=4
    config ok: 8 processes = dp=2 x ulysses=4 x ring=1 (parallel=ulysses), ...

Prints that one line and exits 0, or `longtrain.check: error: ...` (one line) and exits 2.
The launchers (`launch/run.sh`, `python -m launch.slurm`) run it before they start or submit a
job, so a misspelled key costs a second, not a queue wait and torchrun's restarts.
"""

from __future__ import annotations

import argparse
import dataclasses

import parallel
from longtrain.config import RunConfig, compose_config
from longtrain.config.rules import check_global_batch, validate_run_config
from longtrain.distributed.parallelize import resolve_degrees
from longtrain.errors import ConfigError, report_errors
from longtrain.model import validate_model_config


def check_run_config(cfg: RunConfig, world_size: int) -> str:
    """Run every check of `cfg` on `world_size` ranks that needs neither data nor processes;
    returns the `config ok: ...` line, raises ValueError (ConfigError) on the first failure."""
    if world_size < 1:
        raise ConfigError(f"--world-size {world_size}: need at least one process")
    validate_run_config(cfg, world_size)
    if cfg.model.name != "hf":  # model=hf takes its shapes from config.json, checked above
        # vocab_size 0 means "the token store's": data this check does not read.
        validate_model_config(dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 1))
    ulysses, ring = resolve_degrees(cfg, world_size)
    if world_size > 1 or cfg.parallel.method != "none":  # as build_parallel_dims
        dims = parallel.ParallelDims(world_size, ulysses=ulysses, ring=ring)
        dims.validate(cfg.model.n_heads, cfg.model.n_kv_heads, cfg.data.seq_len)
        dp = dims.dp
    else:
        dp = 1
    check_global_batch(cfg.train.global_batch, dp)  # the loader's rule, before a job queues
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    return (
        f"config ok: {processes} = dp={dp} x ulysses={ulysses} x ring={ring} "
        f"(parallel={cfg.parallel.method}), model={cfg.model.name}, "
        f"data.seq_len={cfg.data.seq_len}, train.global_batch={cfg.train.global_batch}, "
        f"train.steps={cfg.train.steps}"
    )


def check_config(overrides: list[str], world_size: int) -> str:
    """Compose `overrides` as longtrain.train would and check them for `world_size` ranks.

    Returns the `config ok: ...` line; raises ValueError (a ConfigError for config mistakes)
    with a one-line message naming the value and the fix."""
    return check_run_config(compose_config(overrides), world_size)


def main(argv: list[str] | None = None) -> None:
    """The `python -m longtrain.check` command."""
    parser = argparse.ArgumentParser(
        prog="python -m longtrain.check",
        description="Check a longtrain config for N processes without data or GPUs.",
    )
    parser.add_argument("--world-size", type=int, required=True, help="processes (ranks)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for longtrain.train")
    args = parser.parse_intermixed_args(argv)
    print(report_errors("longtrain.check", lambda: check_config(args.overrides, args.world_size)))


if __name__ == "__main__":
    main()

__all__ = ["check_config", "check_run_config", "main"]
