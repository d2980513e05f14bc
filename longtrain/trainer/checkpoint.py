"""Exactly-resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run_dir>/checkpoints/step_00000010/` holds the DCP shards of model and optimizer
(resharded on load, so FSDP layouts may change), `extra.pt` (scheduler, loader position,
the RNG states of every rank, the step) and `manifest.json` (size and sha256 of every file,
see `longtrain.trainer.manifest`). A checkpoint is written under `step_XXXXXXXX.tmp` and
renamed when every rank has finished, so a crash never leaves a directory that a resume
would take: resume only ever looks at fully named ones, and loads only one that verifies.

What is never done: save parameters that hold NaN or inf; resume from a checkpoint that fails
verification (`resume=auto` names it and takes the previous one); count such a checkpoint
among the `keep_last` kept ones, or delete a checkpoint newer than the oldest kept good one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from longtrain.distributed import DistEnv, barrier, broadcast_object
from longtrain.distributed.deepspeed_zero import STATE_MARKER, UNIVERSAL_DIR
from longtrain.errors import LongtrainError, one_line
from longtrain.trainer.manifest import MANIFEST, verify_checkpoint, write_manifest

_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(LongtrainError, RuntimeError):
    """A checkpoint that cannot be used; the message names it and what to do."""


def rng_state() -> dict:
    """This process's RNG states as plain data (tensors, ints, tuples, None): what
    `torch.load(weights_only=True)` reads back without unpickling any object."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory `step_XXXXXXXX` was saved after."""
    return int(_NAME.match(Path(path).name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=checkpoint_step)


def check_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless `path` looks like a complete checkpoint."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = STATE_MARKER if (path / STATE_MARKER).is_file() else ".metadata"
    for needed in (state, "extra.pt", MANIFEST):
        if not (path / needed).is_file():
            raise CheckpointError(
                f"checkpoint {path} is incomplete or corrupt (no {needed}); delete it or pass "
                f"train.resume=<an older checkpoint>"
            )


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter `p` this rank holds (FSDP2 DTensor shard, ZeRO-3 partition)."""
    if hasattr(p, "to_local"):
        return p.to_local()
    return getattr(p, "ds_tensor", p)


def parameters_finite(model: torch.nn.Module, env: DistEnv) -> bool:
    """Whether every parameter of `model` is finite on every rank (collective)."""
    bad = any(not torch.isfinite(_local(p).detach()).all() for p in model.parameters())
    flag = torch.tensor([float(bad)], device=env.device)  # NCCL reduces device tensors only
    if env.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


@dataclass
class _PendingSave:
    """An asynchronous save whose shards are still being written in the background."""

    step: int
    tmp: Path
    final: Path
    extra: dict | None  # what rank 0 writes to extra.pt once the shards are done
    written: object  # DCP's Future (or AsyncSaveResponse) of the shards


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        keep_last: int,
        engine=None,
        checksums: bool = True,
        async_save: bool = False,
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.env = env
        self.keep_last = keep_last
        self.engine = engine  # a DeepSpeedRun saves and loads model and optimizer itself
        self.checksums = checksums  # sha256 of every file (else sizes only)
        self.good: set[int] = set()  # steps of checkpoints this run wrote or verified
        # train.ckpt_async: DCP's background writer coordinates the ranks over a gloo group of
        # its own, so its collectives never interleave with the training step's (torchtitan
        # does the same). Creating a group is collective: every rank builds its Checkpointer.
        self.async_save = async_save and engine is None
        self._group = None
        if self.async_save and env.distributed:
            self._group = dist.new_group(backend="gloo")
        self._pending: _PendingSave | None = None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, `auto` (the newest complete one that passes
        verification, or none when there is none) or a path (which must pass). Collective:
        every rank gets the same answer."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            check_checkpoint(path)
            problem = verify_checkpoint(path, self.env, self.checksums)
            if problem:
                raise CheckpointError(
                    f"checkpoint {path} fails verification: {problem}; resume from another one"
                )
            return self._good(path)
        found = complete_checkpoints(self.root) if self.env.is_main else None
        found = broadcast_object(found, self.env)
        failed = []
        for path in reversed(found):
            problem = _structure_problem(path) or verify_checkpoint(path, self.env, self.checksums)
            if problem is None:
                return self._good(path)
            failed.append(f"{path.name}: {problem}")
            if self.env.is_main:
                print(f"skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
        if failed:
            raise CheckpointError(
                f"no checkpoint under {self.root} passes verification ({'; '.join(failed)}); "
                "move them aside to start afresh, or resume from a copy you trust"
            )
        return None

    def _good(self, path: Path) -> Path:
        self.good.add(checkpoint_step(path))
        return path

    def save(self, step: int, model, optimizer, scheduler, loader) -> Path:
        """Write the state after `step` optimizer steps; returns the final directory.
        Collective.

        Synchronous: complete and visible when this returns. With `async_save`: the state is
        staged to host memory here and written in the background; the checkpoint is
        completed (extra.pt, manifest, the rename that makes it visible) by the next `save`
        or by `wait`, whichever comes first, so a resume never sees a partial one.

        Raises CheckpointError (before writing anything) when a parameter is not finite."""
        self.wait()  # one save at a time: the previous one completes first
        if not parameters_finite(model, self.env):
            raise CheckpointError(
                f"not saving a checkpoint at step {step}: the parameters hold NaN or inf"
            )
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
            tmp.mkdir(parents=True)
        barrier(self.env)
        written = None
        with interrupts_unwrapped():
            if self.engine is not None:
                self.engine.save(tmp)
            else:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                state = {"model": model_sd, "optim": optim_sd}
                if self.async_save:
                    written = dcp.async_save(
                        state, checkpoint_id=str(tmp), process_group=self._group
                    )
                else:
                    dcp.save(state, checkpoint_id=str(tmp))
        pending = _PendingSave(step, tmp, final, self._extra(step, scheduler, loader), written)
        if written is not None:
            self._pending = pending
        else:
            self._complete(pending)
        return final

    def wait(self) -> None:
        """Complete the asynchronous save in flight, if any (collective): wait for its
        shards, then write extra.pt and the manifest and make it visible."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        with interrupts_unwrapped():
            result = pending.written
            # torch returns a Future, or a response holding one for the upload.
            (getattr(result, "upload_completion", None) or result).result()
        self._complete(pending)

    def _extra(self, step: int, scheduler, loader) -> dict | None:
        """What extra.pt holds, as of now (collective: every rank's RNG state); rank 0's."""
        rngs = [None] * self.env.world_size
        if self.env.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if not self.env.is_main:
            return None
        # Copies: an asynchronous save writes them a step or more later.
        return {
            "step": step,
            "scheduler": copy.deepcopy(scheduler.state_dict()),
            "loader": copy.deepcopy(loader.state_dict()),
            "rng": rngs,
            "world_size": self.env.world_size,
        }

    def _complete(self, pending: _PendingSave) -> None:
        """extra.pt, every rank's files hashed into the manifest, then the rename that makes
        the checkpoint visible (collective)."""
        if self.env.is_main:
            with interrupts_unwrapped():
                torch.save(pending.extra, pending.tmp / "extra.pt")
        barrier(self.env)  # every file is written: hash them
        write_manifest(pending.tmp, self.env, self.checksums)
        if self.env.is_main:
            shutil.rmtree(pending.final, ignore_errors=True)  # this step's, superseded
            os.replace(pending.tmp, pending.final)
            self.good.add(pending.step)
            self._prune()
        barrier(self.env)

    def _prune(self) -> None:
        """Keep the newest `keep_last` good checkpoints; delete only ones older than all of
        them (and only ones with our manifest), so a checkpoint that failed verification
        never takes a good one's place."""
        if self.keep_last <= 0:  # 0 keeps every checkpoint
            return
        oldest_kept = sorted(self.good)[-self.keep_last :][0]
        for old in complete_checkpoints(self.root):
            if checkpoint_step(old) < oldest_kept and (old / MANIFEST).is_file():
                shutil.rmtree(old, ignore_errors=True)
                self.good.discard(checkpoint_step(old))

    def load(self, path: Path, model, optimizer, scheduler, loader) -> int:
        """Restore everything saved at `path`; returns the number of steps already done."""
        extra = _load_extra(path)
        universal = path / UNIVERSAL_DIR  # a DeepSpeed checkpoint converted to load anywhere
        if self.engine is not None and universal.is_dir():
            problem = verify_checkpoint(universal, self.env, self.checksums)
            if problem is not None:
                raise CheckpointError(
                    f"cannot load checkpoint {path}: its universal conversion does not "
                    f"verify ({problem}); delete {universal} and convert again"
                )
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
        except LongtrainError:
            raise  # says what to do already (a DeepSpeed checkpoint of another layout)
        # DCP's CheckpointException derives from BaseException; any reader error means the
        # files do not fit this run (another model size, a missing shard).
        except (Exception, CheckpointException) as err:
            if interrupt_inside(err):
                raise KeyboardInterrupt from None
            raise CheckpointError(
                f"cannot load checkpoint {path}: {one_line(err)}; resume from another one "
                "or check that the model config matches the one it was saved with"
            ) from err
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["loader"])
        set_rng_state(_rng_for_rank(extra["rng"], self.env))
        return int(extra["step"])


def _load_extra(path: Path) -> dict:
    """`extra.pt` as data: tensors and plain containers only, so loading runs no code."""
    try:
        return torch.load(path / "extra.pt", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"cannot load checkpoint {path}: its extra.pt holds objects other than tensors "
            "and plain data (written by a longtrain before 2026-11, or not by longtrain), and "
            "checkpoint files are never unpickled; resume from another checkpoint"
        ) from None


def _rng_for_rank(saved: list[dict], env: DistEnv) -> dict:
    """The RNG state this rank continues from. At the world size of the save, its own. At
    another (a layout change), rank 0's on every rank: every rank seeds alike at start and a
    step draws no rank-dependent random numbers (the data order comes from the loader's
    seeded schedule, not from these generators), so the saved states are all equal and any
    one of them continues the run exactly."""
    if len(saved) == env.world_size:
        return saved[env.rank]
    return saved[0]


def _structure_problem(path: Path) -> str | None:
    try:
        check_checkpoint(path)
    except CheckpointError as err:
        return str(err)
    return None


def interrupt_inside(err: BaseException) -> bool:
    """Whether a Ctrl-C is what `err` really is. A KeyboardInterrupt that lands inside a
    writer comes back wrapped: DCP puts each rank's exception into a CheckpointException's
    `failures`, and torch.save's zip writer, interrupted mid-record, raises a RuntimeError
    ("unexpected pos ...") whose context is the interrupt. Both chains are walked."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return True
        todo += [exc.__cause__, exc.__context__]
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
    return False


@contextlib.contextmanager
def interrupts_unwrapped():
    """Re-raise a wrapped Ctrl-C (see `interrupt_inside`) as the KeyboardInterrupt it is, so
    the run ends with its one line and status 130, not a writer's error."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        if interrupt_inside(err):
            raise KeyboardInterrupt from None
        raise
