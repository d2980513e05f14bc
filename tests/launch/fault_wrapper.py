"""The trainer with an injected fault, for the elastic-restart test under torchrun.

    python -m torch.distributed.run ... -m tests.launch.fault_wrapper \\
        --kill-rank 1 --kill-after-step 5 hydra.run.dir=DIR [overrides...]

On torchrun's first attempt (TORCHELASTIC_RESTART_COUNT=0) rank `--kill-rank` SIGKILLs itself
right after step `--kill-after-step` is logged, before any checkpoint of that step; later
attempts run clean. Rank 0 appends `attempt N` to DIR/attempts.txt at each start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import longtrain.train as lt_train
from longtrain.metrics import MetricsLogger


def _kill_after(step: int):
    def callback(done_step: int, record: dict) -> None:
        if done_step == step:
            print(f"fault_wrapper: SIGKILL after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def _with_step_callbacks(callbacks) -> type[MetricsLogger]:
    """A MetricsLogger that calls `callbacks(step, record)` after logging each step (on every
    rank). Stands in for a per-step hook of longtrain.train.train until it has one."""

    class CallbackLogger(MetricsLogger):
        def log(self, record: dict) -> None:
            super().log(record)
            for cb in callbacks:
                cb(record["step"], record)

    return CallbackLogger


def main(argv: list[str]) -> None:
    """Parse the fault, then train with the remaining Hydra overrides."""
    p = argparse.ArgumentParser()
    p.add_argument("--kill-rank", type=int, default=-1, help="-1: no fault")
    p.add_argument("--kill-after-step", type=int, default=-1)
    args, rest = p.parse_known_args(argv)
    run_dirs = [a.split("=", 1)[1] for a in rest if a.startswith("hydra.run.dir=")]
    overrides = [a for a in rest if not a.startswith("hydra.run.dir=")]
    run_dir = Path(run_dirs[-1])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "attempts.txt", "a") as f:
            f.write(f"attempt {attempt}\n")
    callbacks = []
    if attempt == 0 and rank == args.kill_rank:
        callbacks.append(_kill_after(args.kill_after_step))
    lt_train.MetricsLogger = _with_step_callbacks(callbacks)
    lt_train.train(lt_train.load_config(overrides), run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
