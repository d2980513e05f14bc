"""The trainer with an injected fault, for the restart and hang tests under torchrun.

    python -m torch.distributed.run ... -m tests.launch.fault_wrapper \\
        --kill-rank 1 --kill-after-step 5 hydra.run.dir=DIR [overrides...]
    ... -m tests.launch.fault_wrapper --sleep-rank 1 --sleep-after-step 2 hydra.run.dir=DIR ...
    ... -m tests.launch.fault_wrapper --kill-rank 1 --kill-during-save 6 hydra.run.dir=DIR ...

On torchrun's first attempt (TORCHELASTIC_RESTART_COUNT=0) rank `--kill-rank` SIGKILLs itself
once step `--kill-after-step` is done, or (`--kill-during-save N`) in the middle of writing
the checkpoint of step N: its DCP shards written, the checkpoint not yet complete; later
attempts run clean. Rank `--sleep-rank` instead
sleeps `--sleep-s` seconds there (a hang), after writing the time to DIR/sleep_started.
Rank 0 appends `attempt N` to DIR/attempts.txt at each start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from longtrain.train import load_config, train


def _kill_after(step: int):
    def callback(done_step: int, record: dict) -> None:
        if done_step == step:
            print(f"fault_wrapper: SIGKILL after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def _kill_during_save(step: int) -> None:
    """SIGKILL this process right after it wrote its DCP shards of checkpoint `step`."""
    from longtrain.trainer import checkpoint

    real_save = checkpoint.dcp.save

    def save(state, checkpoint_id, **kwargs):
        out = real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if Path(checkpoint_id).name == f"step_{step:08d}.tmp":
            print(f"fault_wrapper: SIGKILL during the save of step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    checkpoint.dcp.save = save


def _sleep_after(step: int, seconds: float, stamp: Path):
    def callback(done_step: int, record: dict) -> None:
        if done_step == step:
            stamp.write_text(str(time.time()))
            time.sleep(seconds)

    return callback


def main(argv: list[str]) -> None:
    """Parse the fault, then train with the remaining Hydra overrides."""
    p = argparse.ArgumentParser()
    p.add_argument("--kill-rank", type=int, default=-1, help="-1: no kill")
    p.add_argument("--kill-after-step", type=int, default=-1)
    p.add_argument("--kill-during-save", type=int, default=-1)
    p.add_argument("--sleep-rank", type=int, default=-1, help="-1: no sleep")
    p.add_argument("--sleep-after-step", type=int, default=-1)
    p.add_argument("--sleep-s", type=float, default=60.0)
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
    if attempt == 0 and rank == args.kill_rank and args.kill_during_save >= 0:
        _kill_during_save(args.kill_during_save)
    elif attempt == 0 and rank == args.kill_rank:
        callbacks.append(_kill_after(args.kill_after_step))
    if attempt == 0 and rank == args.sleep_rank:
        stamp = run_dir / "sleep_started"
        callbacks.append(_sleep_after(args.sleep_after_step, args.sleep_s, stamp))
    train(load_config(overrides), run_dir, step_callbacks=callbacks)


if __name__ == "__main__":
    main(sys.argv[1:])
