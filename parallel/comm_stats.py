"""Communication accounting: what each rank sends and receives, per collective kind, and the
analytic bytes of each sequence-parallel method.

Legend: T_local tokens on this SP rank, Hq query heads, K KV heads, D head dim, e bytes per
element of the activations, a bytes per element of gradient accumulators (4 for 16-bit
inputs, else e), U Ulysses degree, R ring degree, hq = Hq / U, hk = KV heads per Ulysses
rank (K / U, or 1 when U % K == 0: each KV head then goes to U / K ranks).

"Sent" counts bytes that leave the rank (an all-to-all's own chunk stays home and is not
counted); every method here is symmetric, so received == sent. Per attention call:

Ulysses (2 all-to-alls forward, 2 backward: q, k, v travel together in one):
    forward  = (U-1) T_local D e (hq + 2 hk)  [q, k, v in]  + (U-1) T_local D e hq  [out back]
    backward = the same (dout in, then dq, dk, dv back), with a = e for dk, dv
Ring, zigzag P2P (R-1 exchanges forward; backward R-1 K/V exchanges + R dK/dV exchanges):
    forward  = (R-1) 2 T_local K D e
    backward = (R-1) 2 T_local K D e + R 2 T_local K D a
Ring, all-gather (1 all-gather forward; backward 1 all-gather + 1 reduce-scatter):
    forward  = (R-1) 2 T_local K D e
    backward = (R-1) 2 T_local K D e + (R-1) 2 T_local K D a
USP: Ulysses over U on T_local tokens, then the ring over R on T_R = U T_local tokens with
hk KV heads per rank.
K/V are never repeated to the query head count before they are sent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from parallel.dims import kv_heads_per_rank
from parallel.layout import check_method

KINDS = ("all_to_all", "p2p", "all_gather", "reduce_scatter")


class CommStats:
    """Counts collectives and bytes of one rank, per kind; passed explicitly to the SP
    modules (`parallel.apply` attaches one). Not thread-safe; cheap (a few dict updates)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()

    def record(self, kind: str, sent: int, received: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")
        self.calls[kind] += 1
        self.sent[kind] += int(sent)
        self.received[kind] += int(received)

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())

    def reset(self) -> None:
        self.calls.clear()
        self.sent.clear()
        self.received.clear()

    def step_metrics(self, reset: bool = True) -> dict[str, int]:
        """Metrics of the step so far for metrics.jsonl (this rank's numbers): `comm_bytes`
        (sent), `comm_bytes_recv`, `comm_calls`, and `comm_bytes/<kind>`; resets by default."""
        out = {
            "comm_bytes": self.bytes_sent,
            "comm_bytes_recv": self.bytes_received,
            "comm_calls": sum(self.calls.values()),
        }
        out.update({f"comm_bytes/{k}": self.sent[k] for k in KINDS if self.calls[k]})
        if reset:
            self.reset()
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {self.calls[k]} calls {self.sent[k]} B" for k in KINDS)
        return f"CommStats({parts})"


def record(stats: CommStats | None, kind: str, sent: int, received: int) -> None:
    """Record into `stats` when one is given (the SP functions accept None)."""
    if stats is not None:
        stats.record(kind, sent, received)


@dataclass(frozen=True)
class CommCost:
    """Bytes sent by one rank, and collective calls, for one attention forward / backward."""

    fwd_bytes: int
    bwd_bytes: int
    fwd_calls: dict[str, int]
    bwd_calls: dict[str, int]


def acc_size(dtype: torch.dtype) -> int:
    """Bytes per element of gradient accumulators: float32 for 16-bit inputs."""
    return max(torch.finfo(dtype).bits // 8, 4)


def ulysses_cost(
    t_local: int, num_heads: int, num_kv_heads: int, head_dim: int, ulysses: int, dtype
) -> CommCost:
    """Ulysses alone (attention on the gathered sequence); see the module docstring."""
    e = torch.finfo(dtype).bits // 8
    hq, hk = num_heads // ulysses, kv_heads_per_rank(num_kv_heads, ulysses)
    per = (ulysses - 1) * t_local * head_dim * e
    fwd = per * (hq + 2 * hk) + per * hq
    calls = {"all_to_all": 2} if ulysses > 1 else {}
    return CommCost(fwd, fwd, calls, dict(calls))


def ring_cost(t_local: int, num_kv_heads: int, head_dim: int, ring: int, dtype, impl: str):
    """Ring alone over `ring` ranks holding `t_local` tokens each; impl zigzag | allgather."""
    e, a = torch.finfo(dtype).bits // 8, acc_size(dtype)
    block = 2 * t_local * num_kv_heads * head_dim  # K and V elements of one rank
    if ring == 1:
        return CommCost(0, 0, {}, {})
    check_method("ring", impl)
    if impl == "zigzag":
        fwd = (ring - 1) * block * e
        bwd = (ring - 1) * block * e + ring * block * a
        return CommCost(fwd, bwd, {"p2p": ring - 1}, {"p2p": 2 * ring - 1})
    fwd = (ring - 1) * block * e  # allgather
    bwd = (ring - 1) * block * e + (ring - 1) * block * a
    return CommCost(fwd, bwd, {"all_gather": 1}, {"all_gather": 1, "reduce_scatter": 1})


def usp_cost(
    t_local: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    ulysses: int,
    ring: int,
    dtype,
    impl: str,
) -> CommCost:
    """Ulysses over `ulysses` ranks around a ring over `ring` ranks (either may be 1)."""
    u = ulysses_cost(t_local, num_heads, num_kv_heads, head_dim, ulysses, dtype)
    hk = kv_heads_per_rank(num_kv_heads, ulysses)
    r = ring_cost(t_local * ulysses, hk, head_dim, ring, dtype, impl)
    return CommCost(
        u.fwd_bytes + r.fwd_bytes,
        u.bwd_bytes + r.bwd_bytes,
        dict(Counter(u.fwd_calls) + Counter(r.fwd_calls)),
        dict(Counter(u.bwd_calls) + Counter(r.bwd_calls)),
    )


__all__ = [
    "KINDS",
    "CommCost",
    "CommStats",
    "acc_size",
    "record",
    "ring_cost",
    "ulysses_cost",
    "usp_cost",
]
