"""The cost model of adaptive placement: which documents of a micro-batch stay whole on one
SP rank (`parallel.adaptive`), chosen per micro-batch from the document lengths alone.

Legend: P SP ranks (ring R x Ulysses U), L_d one document's length, S the split documents'
tokens, T_local_s their tokens on one rank after the layout's padding, Hq / K query / KV
heads, D head dim, E model width, F MLP width.

Per layer and per rank, in seconds (forward and backward together):

    compute_r = pair_s * pairs_r + token_s * tokens_r      (the busiest rank sets the pace)
    comm      = bytes / bytes_per_s + collectives * latency_s   (the split documents' layout)
    time      = max_r compute_r + comm

plus, on every rank, `SPCostModel.split_overhead` (0 unless calibrated) times T_local_s: the
work of the split method the formulas leave out (the all-to-all's packing, the ring's merges
and smaller blocks), per token; the start-up calibration measures it per method as what the
method took on a probe document beyond the rest of the model's prediction.

pairs_r: the (query, key) pairs rank r attends, L(L+1)/2 per causal document (L^2 full);
its local documents whole, plus 1/P of every split document (zigzag and Ulysses balance
them). tokens_r: the tokens it runs through the projections and MLP. The bytes and the
collectives are `parallel.usp_cost`'s, the same formulas CommStats is tested against.

The coefficients come from the model and the device (`SPCostModel.analytic`: FLOPs over a
sustained TFLOP/s, a link's GB/s and latency), so the choice is a pure function of the
lengths: every rank makes the same one with no communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from parallel.adaptive import (
    Placement,
    place_documents,
    shard_packed_adaptive,
    split_local_tokens,
)
from parallel.comm_stats import usp_cost
from parallel.layout import ShardedLayout

# flash-attention's convention: a backward costs 2.5 forwards (5 GEMMs to 2).
FWD_BWD = 3.5


@dataclass(frozen=True)
class SPCostModel:
    """Seconds per unit of one layer, forward and backward (see the module docstring)."""

    pair_s: float  # one attended (query, key) pair, all heads
    token_s: float  # one token through the block's projections and MLP
    bytes_per_s: float  # one rank's link bandwidth
    latency_s: float  # fixed cost of one collective or P2P exchange
    # (method_key(ring, ulysses, ring_impl), seconds per split token) per calibrated method
    split_overheads: tuple[tuple[str, float], ...] = ()

    def split_overhead(self, ring: int, ulysses: int, ring_impl: str) -> float:
        """Seconds per token of a rank's split share that one split layout costs beyond the
        formulas (0.0 when not calibrated)."""
        return dict(self.split_overheads).get(method_key(ring, ulysses, ring_impl), 0.0)

    @classmethod
    def analytic(
        cls, n_heads: int, n_kv_heads: int, head_dim: int, dim: int, ffn_dim: int,
        tflops: float, link_gbps: float, latency_us: float,
    ) -> SPCostModel:  # fmt: skip
        """From the model's shapes and the device: 4 Hq D FLOPs per attended pair (QK and PV)
        and 2 FLOPs per weight per token (q, k, v, o projections and the SwiGLU MLP), each
        times FWD_BWD, at `tflops` TFLOP/s; links of `link_gbps` GB/s and `latency_us` us."""
        if min(tflops, link_gbps) <= 0 or latency_us < 0:
            raise ValueError(
                f"the SP cost model needs tflops > 0, link_gbps > 0 and latency_us >= 0, got "
                f"{tflops}, {link_gbps}, {latency_us}"
            )
        flops = tflops * 1e12
        weights = dim * (2 * n_heads + 2 * n_kv_heads) * head_dim + 3 * dim * ffn_dim
        return cls(
            pair_s=FWD_BWD * 4 * n_heads * head_dim / flops,
            token_s=FWD_BWD * 2 * weights / flops,
            bytes_per_s=link_gbps * 1e9,
            latency_s=latency_us * 1e-6,
        )


def method_key(ring: int, ulysses: int, ring_impl: str) -> str:
    """The name of a split layout in `SPCostModel.split_overheads`, e.g. `ring4:zigzag`,
    `ulysses4`, `ring2:allgather x ulysses2` (ring_impl only matters with a ring)."""
    parts = ([f"ring{ring}:{ring_impl}"] if ring > 1 else []) + (
        [f"ulysses{ulysses}"] if ulysses > 1 else []
    )
    return " x ".join(parts) or "none"


@dataclass(frozen=True)
class AttnShape:
    """What the communication formulas need: heads, head dim, element bytes as a dtype."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: object  # a torch dtype


@dataclass(frozen=True)
class PlacementCost:
    """The cost model's view of one placement (per layer, forward and backward)."""

    seconds: float
    local_tokens: int  # over the whole SP group
    split_tokens: int
    comm_bytes: int  # sent by one rank


def _pairs(length: int, causal: bool) -> int:
    return length * (length + 1) // 2 if causal else length * length


def placement_cost(
    lengths: list[int],
    placement: Placement,
    ring: int,
    ulysses: int,
    ring_impl: str,
    shape: AttnShape,
    model: SPCostModel,
    causal: bool = True,
) -> PlacementCost:
    """Predicted time of `placement` (see the module docstring)."""
    P = placement.sp_size
    split = [lengths[d] for d in placement.split if lengths[d] > 0]
    t_split = split_local_tokens(split, ring, ulysses)
    split_pairs = sum(_pairs(n, causal) for n in split) / P
    pairs, tokens = [split_pairs] * P, [t_split] * P
    for d, owner in enumerate(placement.owner):
        if owner >= 0:
            pairs[owner] += _pairs(lengths[d], causal)
            tokens[owner] += lengths[d]
    overhead = model.split_overhead(ring, ulysses, ring_impl) * t_split
    compute = overhead + max(model.pair_s * p + model.token_s * t for p, t in zip(pairs, tokens))
    comm_bytes, calls = 0, 0
    if split:
        c = usp_cost(t_split, shape.n_heads, shape.n_kv_heads, shape.head_dim, ulysses, ring,
                     shape.dtype, ring_impl)  # fmt: skip
        comm_bytes = c.fwd_bytes + c.bwd_bytes
        calls = sum(c.fwd_calls.values()) + sum(c.bwd_calls.values())
    seconds = compute + comm_bytes / model.bytes_per_s + calls * model.latency_s
    local = sum(n for d, n in enumerate(lengths) if placement.owner[d] >= 0)
    return PlacementCost(seconds, local, sum(split), comm_bytes)


def candidate_thresholds(lengths: list[int]) -> list[int]:
    """0 (every document split: the fixed method) and powers of two up to the longest
    document, and the longest itself: a short list (the choice runs every micro-batch)."""
    longest = max(lengths, default=0)
    out, t = [0], 1
    while t < longest:
        out.append(t)
        t *= 2
    return out + ([longest] if longest else [])


@dataclass(frozen=True)
class SplitMethod:
    """How split documents run: a name for metrics, the ring x ulysses layout, the ring
    variant (zigzag | allgather)."""

    name: str
    ring: int
    ulysses: int
    ring_impl: str = "zigzag"


@dataclass(frozen=True)
class Choice:
    """One micro-batch's choice: the split documents' method, the placement, its cost."""

    method: SplitMethod
    placement: Placement
    cost: PlacementCost


@dataclass
class AdaptivePolicy:
    """Chooses, per micro-batch, which documents stay whole and how the rest are split:
    every (method, threshold) of `methods` x `candidate_thresholds` (or the fixed
    `threshold` when > 0) by least predicted time. The first method is the layout the run
    was planned with: with threshold 0 it wins ties (adaptive placement is never predicted
    slower than it), and its tokens per rank (all documents split) times 1 + `slack` cap
    every placement, the worst case the planner plans (longtrain.planner.simulate)."""

    methods: list[SplitMethod]
    shape: AttnShape
    model: SPCostModel
    n_layers: int = 1
    threshold: int = 0
    slack: float = 0.25  # a rank may hold up to 1 + slack times the planned layout's tokens
    causal: bool = True
    _choices: dict = field(default_factory=dict, repr=False)  # lengths -> Choice

    def choose(self, lengths: list[int]) -> Choice:
        """The choice for one micro-batch of documents of `lengths` tokens (remembered: the
        step's metrics and the sharding ask for the same micro-batch)."""
        key = tuple(lengths)
        if key not in self._choices:
            if len(self._choices) >= 64:
                self._choices.clear()
            self._choices[key] = self._choose(list(key))
        return self._choices[key]

    def _choose(self, lengths: list[int]) -> Choice:
        planned = self.methods[0]
        fixed = split_local_tokens(lengths, planned.ring, planned.ulysses)
        capacity = math.ceil(fixed * (1 + self.slack))
        thresholds = [self.threshold] if self.threshold > 0 else candidate_thresholds(lengths)
        best = None
        for method in self.methods:
            for t in thresholds:
                placement = place_documents(lengths, t, method.ring, method.ulysses, capacity)
                cost = placement_cost(
                    lengths, placement, method.ring, method.ulysses, method.ring_impl,
                    self.shape, self.model, self.causal,
                )  # fmt: skip
                if best is None or cost.seconds < best.cost.seconds:
                    best = Choice(method, placement, cost)
        return best

    def shard(
        self, cu_seqlens_N1: torch.Tensor, total_tokens: int, sp_rank: int
    ) -> tuple[ShardedLayout, Choice]:
        """This rank's shard of one micro-batch under the chosen placement, and the choice."""
        lengths = (cu_seqlens_N1[1:] - cu_seqlens_N1[:-1]).tolist()
        choice = self.choose(lengths)
        m = choice.method
        layout = shard_packed_adaptive(cu_seqlens_N1, total_tokens, choice.placement, m.ring,
                                       m.ulysses, sp_rank, m.ring_impl)  # fmt: skip
        return layout, choice


__all__ = [
    "AdaptivePolicy",
    "AttnShape",
    "Choice",
    "PlacementCost",
    "SPCostModel",
    "SplitMethod",
    "candidate_thresholds",
    "method_key",
    "placement_cost",
]
