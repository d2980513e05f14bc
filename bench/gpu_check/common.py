"""Shared by the sections: the repository root, GiB, progress lines, budgets, error text,
device sync and the max-abs-error comparison."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MIN_SECTION_S = 5.0  # with less left overall, a section is skipped rather than started

_T0 = time.monotonic()


def say(message: str) -> None:
    """One progress line, flushed at once so a killed run still shows how far it came."""
    print(f"[gpu_check {time.monotonic() - _T0:6.1f}s] {message}", flush=True)


class Deadline:
    """A wall-clock budget: `left()` seconds until a fixed moment (negative once past), on
    `clock` (time.monotonic; tests pass their own)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.end = clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()


def error_text(err: BaseException) -> str:
    """`Type: first 400 characters of the message`, one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| over all elements, computed in float64 in pieces of 2^24 elements (no
    full-size float64 copy of x)."""
    pieces = zip(x.detach().reshape(-1).split(1 << 24), ref.reshape(-1).split(1 << 24))
    return max((float((a.double() - b).abs().max()) for a, b in pieces), default=0.0)
