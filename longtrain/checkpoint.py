"""Exactly-resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run_dir>/checkpoints/step_00000010/` holds the DCP shards of model and optimizer
(resharded on load, so FSDP layouts may change) and `extra.pt` (scheduler, loader position,
the RNG states of every rank, the step). A checkpoint is written under `step_XXXXXXXX.tmp`
and renamed when every rank has finished, so a crash never leaves a directory that a resume
would take: resume only ever looks at fully named ones.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from longtrain.distributed import DistEnv, barrier, broadcast_object
from longtrain.engines.deepspeed_engine import STATE_MARKER

_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and what to do."""


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` looks like a complete checkpoint."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = STATE_MARKER if (path / STATE_MARKER).is_file() else ".metadata"
    for needed in (state, "extra.pt"):
        if not (path / needed).is_file():
            raise CheckpointError(
                f"checkpoint {path} is incomplete or corrupt (no {needed}); delete it or pass "
                f"train.resume=<an older checkpoint>"
            )


class Checkpointer:
    def __init__(self, run_dir: Path, env: DistEnv, keep_last: int, engine=None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.env = env
        self.keep_last = keep_last
        self.engine = engine  # a DeepSpeedRun saves and loads model and optimizer itself

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, `auto` (newest complete one, or none) or a
        path. Checked on rank 0 and agreed by every rank."""
        if resume == "none":
            return None
        if resume == "auto":
            found = complete_checkpoints(self.root) if self.env.is_main else None
            found = broadcast_object(found, self.env)
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(resume)
        check_checkpoint(path)
        return path

    def save(self, step: int, model, optimizer, scheduler, loader) -> Path:
        """Write the state after `step` optimizer steps; returns the final directory."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        if self.engine is not None:
            self.engine.save(tmp)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        rngs = [None] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if self.env.is_main:
            extra = {
                "step": step,
                "scheduler": scheduler.state_dict(),
                "loader": loader.state_dict(),
                "rng": rngs,
                "world_size": self.env.world_size,
            }
            torch.save(extra, tmp / "extra.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if self.keep_last > 0:  # 0 keeps every checkpoint
                for old in complete_checkpoints(self.root)[: -self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        barrier(self.env)
        return final

    def load(self, path: Path, model, optimizer, scheduler, loader) -> int:
        """Restore everything saved at `path`; returns the number of steps already done."""
        try:
            if self.engine is not None:
                self.engine.load(path)
            else:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                state = {"model": model_sd, "optim": optim_sd}
                dcp.load(state, checkpoint_id=str(path))
                set_state_dict(
                    model,
                    optimizer,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optim"],
                )
            extra = torch.load(path / "extra.pt", weights_only=False)
        except Exception as err:  # any reader error means the files are unusable
            raise CheckpointError(
                f"cannot read checkpoint {path}: {err}; delete it or resume from an older one"
            ) from err
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["loader"])
        if extra["world_size"] == self.env.world_size:
            set_rng_state(extra["rng"][self.env.rank])
        return int(extra["step"])
