"""`python -m longtrain.train [overrides]`, alone or under torchrun: the training entry point.

A thin Hydra main: the config is composed and checked (`longtrain.config`), the processes are
set up (`longtrain.distributed`), and the loop runs (`longtrain.trainer.loop`: start, then run).
A bad value, path or checkpoint, a non-finite loss and Ctrl-C end in one line on stderr.
"""

from __future__ import annotations

if __name__ == "__main__":
    # The command records SIGTERM and SIGUSR1 from its first moment (imports take seconds,
    # a rendezvous may wait long): see longtrain.trainer.preemption. Not when imported.
    from longtrain.trainer.preemption import PreemptionHandler

    PreemptionHandler().install()

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from longtrain.config import (
    RunConfig,
    compose_config,
    precheck_overrides,
    register_configs,
    to_run_config,
)
from longtrain.distributed import init_distributed, shutdown
from longtrain.errors import report_errors
from longtrain.trainer import loop
from longtrain.trainer.loop import StepCallback


def load_config(overrides: list[str] | None = None) -> RunConfig:
    """The typed config that `python -m longtrain.train *overrides` would run with."""
    return compose_config(overrides)


def train(cfg: RunConfig, run_dir: Path, step_callbacks: Sequence[StepCallback] = ()) -> Path:
    """Train as `cfg` says, writing into `run_dir`; returns the run directory used.

    Each of `step_callbacks` is called as `callback(step, record)` on every rank once step
    `step` is done (logged, and checkpointed when due); `record` is its metrics.jsonl line."""
    env = init_distributed(cfg.train.dist_timeout_s)
    try:
        return loop.run(loop.start(cfg, run_dir, env), step_callbacks)
    except loop.StoppedBeforeStart as stopped:
        # Preempted before anything was done: ends like a finished run (exit status 0, see
        # loop._stop_if_signalled), with its one line.
        if env.is_main:
            print(stopped.message, file=sys.stderr, flush=True)
        return stopped.run_dir
    finally:
        shutdown(env)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def _main(dcfg: DictConfig) -> None:
    report_errors(
        "longtrain.train",
        lambda: train(to_run_config(dcfg), Path(HydraConfig.get().runtime.output_dir)),
    )


def main() -> None:
    """The command: register the schema with Hydra, then let Hydra parse the overrides."""
    register_configs()
    precheck_overrides("longtrain.train", sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
