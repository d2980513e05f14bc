"""A stand-in for the trainer under `launch/run.sh`: each rank writes what it was given.

    python -m tests.launch.echo_rank hydra.run.dir=DIR [overrides...]

writes `DIR/rank<RANK>.json` with its arguments and torchrun's variables, and prints one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    """Record argv and torchrun's environment for this rank under hydra.run.dir."""
    run_dir = next(Path(a.split("=", 1)[1]) for a in argv if a.startswith("hydra.run.dir="))
    names = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_PORT",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
    )
    env = {k: os.environ.get(k) for k in names}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"rank{env['RANK']}.json").write_text(json.dumps({"argv": argv, "env": env}))
    print(f"echo_rank: rank {env['RANK']} of {env['WORLD_SIZE']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
