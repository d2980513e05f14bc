"""Communication primitives (parallel/comm.py, parallel/comm_stats.py): RingComm's strict
lifecycle, its rotation, and the byte accounting of each wrapper (exact: no arithmetic)."""

from __future__ import annotations

import pytest
import torch

from parallel.comm import RingComm, all_gather, all_to_all, reduce_scatter
from parallel.comm_stats import CommStats, ring_cost, ulysses_cost, usp_cost
from tests.spawn import spawn


def _misuse(fn) -> str:
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return "no error"


def _comm_worker(rank: int, world_size: int) -> dict:
    group = torch.distributed.group.WORLD
    stats = CommStats()
    out = {}
    # Rotation: after k exchanges each rank holds the tensor of rank - k.
    comm = RingComm(group, stats)
    x = torch.full((3,), float(rank), dtype=torch.float64)
    seen = []
    for _ in range(world_size):
        recv = comm.send_recv(x)
        comm.commit()
        comm.wait()
        x = recv
        seen.append(int(x[0]))
    comm.assert_idle()
    out["seen"] = seen
    out["p2p"] = (stats.calls["p2p"], stats.sent["p2p"], stats.received["p2p"])
    # Misuse, each on a fresh comm (nothing is sent, so ranks stay in step).
    c = RingComm(group)
    out["wait_first"] = _misuse(c.wait)
    out["commit_empty"] = _misuse(c.commit)
    c.send_recv(torch.zeros(2))
    out["busy"] = _misuse(c.assert_idle)
    c.commit()
    out["send_in_flight"] = _misuse(lambda: c.send_recv(torch.zeros(2)))
    out["commit_twice"] = _misuse(c.commit)
    c.wait()
    out["non_contiguous"] = _misuse(lambda: c.send_recv(torch.zeros(2, 2).t()))
    out["bad_recv"] = _misuse(lambda: c.send_recv(torch.zeros(2), torch.zeros(3)))
    # Wrappers: bytes leaving the rank.
    stats.reset()
    inp = torch.arange(8, dtype=torch.float32) + 10 * rank
    a2a = torch.empty_like(inp)
    all_to_all(group, a2a, inp, stats)
    gathered = torch.empty(8 * world_size)
    all_gather(group, gathered, inp, stats)
    scattered = torch.empty(8 // world_size)
    reduce_scatter(group, scattered, inp, stats)
    out["a2a"], out["gathered"], out["scattered"] = a2a, gathered, scattered
    out["sent"], out["received"] = dict(stats.sent), dict(stats.received)
    out["metrics"] = stats.step_metrics()
    out["after_reset"] = stats.bytes_sent
    return out


@pytest.mark.distributed
def test_ring_comm_and_wrappers():
    P = 2
    res = spawn(_comm_worker, P)
    for rank, r in enumerate(res):
        assert r["seen"] == [(rank - k) % P for k in range(1, P + 1)]
        assert r["p2p"] == (P, P * 3 * 8, P * 3 * 8)  # 3 float64 per exchange
        assert "without commit" in r["wait_first"]
        assert "nothing queued" in r["commit_empty"]
        assert "left busy: 2 ops queued" in r["busy"]
        assert "in flight" in r["send_in_flight"]
        assert "commit twice" in r["commit_twice"]
        assert "contiguous" in r["non_contiguous"]
        assert "does not match" in r["bad_recv"]
        # all_to_all of 8 float32: half stays home; all_gather / reduce_scatter: (P-1) chunks.
        assert r["sent"] == {"all_to_all": 16, "all_gather": 32, "reduce_scatter": 16}
        assert r["received"] == r["sent"]
        assert r["metrics"]["comm_bytes"] == 64 and r["metrics"]["comm_calls"] == 3
        assert r["after_reset"] == 0
        chunk = torch.arange(4, dtype=torch.float32)
        assert r["a2a"].tolist() == torch.cat([chunk + 4 * rank, chunk + 4 * rank + 10]).tolist()
        assert (
            r["gathered"].tolist()
            == torch.cat([torch.arange(8.0), torch.arange(8.0) + 10]).tolist()
        )
        assert r["scattered"].tolist() == (2 * (torch.arange(4.0) + 4 * rank) + 10).tolist()


def test_formulas():
    # Ulysses over 4, 100 tokens per rank, 8 query / 2 KV heads, D 64, bf16: hq 2, hk 1 (each
    # KV head replicated to the 2 ranks that need it).
    c = ulysses_cost(100, 8, 2, 64, 4, torch.bfloat16)
    assert c.fwd_bytes == 3 * 100 * 64 * 2 * (2 + 2 * 1) + 3 * 100 * 64 * 2 * 2
    assert c.fwd_calls == {"all_to_all": 2} and c.bwd_bytes == c.fwd_bytes
    # Ring of 4, zigzag: 3 K/V hops forward; backward 3 K/V hops + 4 dK/dV hops in float32.
    block = 2 * 100 * 2 * 64
    z = ring_cost(100, 2, 64, 4, torch.bfloat16, "zigzag")
    assert (z.fwd_bytes, z.bwd_bytes) == (3 * block * 2, 3 * block * 2 + 4 * block * 4)
    assert z.bwd_calls == {"p2p": 7}
    a = ring_cost(100, 2, 64, 4, torch.float64, "allgather")
    assert (a.fwd_bytes, a.bwd_bytes) == (3 * block * 8, 6 * block * 8)
    # USP 2 x 2: the ring sees 200 tokens per ring rank and 1 KV head per rank.
    u = usp_cost(100, 8, 2, 64, 2, 2, torch.float32, "zigzag")
    uly = ulysses_cost(100, 8, 2, 64, 2, torch.float32)
    ring = ring_cost(200, 1, 64, 2, torch.float32, "zigzag")
    assert u.fwd_bytes == uly.fwd_bytes + ring.fwd_bytes
    assert u.fwd_calls == {"all_to_all": 2, "p2p": 1}
    with pytest.raises(ValueError, match="ring_impl='tree'; expected one of zigzag, allgather"):
        ring_cost(1, 1, 1, 2, torch.float32, "tree")
    with pytest.raises(ValueError, match="unknown collective kind"):
        CommStats().record("broadcast", 1, 1)
