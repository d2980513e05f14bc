"""The shared spawn helper (tests/spawn.py): results in rank order, rank-prefixed output,
the failing rank's traceback, and a timeout that kills every process."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.spawn import spawn

pytestmark = pytest.mark.distributed


def _sum_ranks(rank: int, world_size: int, offset: int) -> torch.Tensor:
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    print(f"sum is {int(t)}")
    return t


def _fail_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()


def _hang_on_one(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)


def test_results_and_prefixed_output(capfd):
    assert [int(t) for t in spawn(_sum_ranks, 2, 10)] == [21, 21]
    out = capfd.readouterr().out
    assert "[rank 0] sum is 21" in out and "[rank 1] sum is 21" in out


def test_failure_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match=r"rank 1 failed first") as info:
        spawn(_fail_on_one, 2)
    assert "[rank 1] ValueError: rank one refuses" in str(info.value)


def test_timeout_kills_everything():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish"):
        spawn(_hang_on_one, 2, timeout=8)
    assert time.monotonic() - t0 < 30  # killed, not waited for
