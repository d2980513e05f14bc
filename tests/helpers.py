"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import torch


def cu_seqlens(
    lengths: Sequence[int], dtype: torch.dtype = torch.int32, device: str = "cpu"
) -> torch.Tensor:
    """Cumulative document boundaries [N+1] of documents with these lengths: [0, l0, l0+l1, ...]."""
    return torch.tensor([0, *lengths]).cumsum(0).to(dtype=dtype, device=device)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["cu_seqlens", "free_port"]
