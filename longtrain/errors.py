"""Errors a user can act on, and how a command line reports them: one line, no traceback.

Every `python -m longtrain...` entry point runs its work through `report_errors`, which turns
a `LongtrainError`, a `ValueError`, a missing file, or DCP's `CheckpointException` (a
`BaseException`, so `except Exception` misses it) into `<prog>: error: <message>` on stderr
and exit status 2, and Ctrl-C into one line and status 130. Anything else (a bug) keeps its
traceback. `LONGTRAIN_FULL_ERROR=1` shows the traceback of user errors too, for debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2  # a bad value, path or checkpoint: rerunning unchanged fails the same way
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class LongtrainError(Exception):
    """Something the user gave or asked for cannot work; the message names it and the fix."""


class ConfigError(LongtrainError, ValueError):
    """A config value that cannot work (raised before any work starts)."""


class DataError(LongtrainError, ValueError):
    """A source, token store or output directory that cannot be used as asked."""


class NonFiniteError(LongtrainError, RuntimeError):
    """A step produced a non-finite loss or gradient norm (the weights were not updated)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says at which step and how to resume."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (
        LongtrainError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )
    # DCP's reader errors (truncated or missing shards, other shapes) derive BaseException.
    # Only a process that imported DCP can raise one: no torch import for the others' errors.
    dcp_api = sys.modules.get("torch.distributed.checkpoint.api")
    return errors if dcp_api is None else (*errors, dcp_api.CheckpointException)


def _prefix(prog: str) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = os.environ.get("RANK")
    return f"{prog} [rank {rank}]" if world > 1 and rank is not None else prog


def one_line(err: BaseException) -> str:
    """The message of `err` (its type when it has none), whitespace folded onto one line.

    DCP's CheckpointException carries each failing rank's exception and traceback: only the
    exceptions are kept ("rank 0: ValueError: ...")."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        text = "; ".join(
            f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in failures.items()
        )
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


def report_errors(prog: str, fn: Callable[[], T]) -> T:
    """Run `fn()`; a user error or Ctrl-C ends the process with one line on stderr.

    Args:
        prog: the command's name, e.g. "longtrain.train" (under torchrun the rank is added).
        fn: the command's work.
    Returns:
        what `fn` returns.
    """
    try:
        return fn()
    except KeyboardInterrupt as err:
        text = str(err) if isinstance(err, RunInterrupted) else "interrupted"
        print(f"{_prefix(prog)}: {text}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except _user_errors() as err:
        if os.environ.get("LONGTRAIN_FULL_ERROR") == "1":
            raise
        print(f"{_prefix(prog)}: error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "ConfigError",
    "DataError",
    "LongtrainError",
    "NonFiniteError",
    "RunInterrupted",
    "one_line",
    "report_errors",
]
