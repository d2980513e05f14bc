"""Adaptive per-document placement inside an SP group: short documents whole on one rank,
the rest split (`parallel=auto`, `parallel.adaptive=true`; the choice: adaptive_cost.py).

Legend: T tokens of the micro-batch, P SP ranks, N documents, L_d one document's length,
T_local tokens on one SP rank (unequal across ranks here).

Each document of a micro-batch is either *local* (whole on one SP rank: its attention needs no
communication) or *split* (over the whole SP group by today's layouts: Ulysses, ring zigzag
or USP, built by `SPLayout` over the split documents alone). A rank's tokens are its local
documents, in batch order, followed by its share of the split documents:

    [local documents of rank p | split documents' SPLayout shard of rank p]

The placement is a pure function of the document lengths, the threshold, the layout and a
token capacity per rank, so every rank computes the same one without communication. Local
documents go to ranks longest first, each to the rank with the least attention cost so far
(sum of L^2; ties: fewer tokens, then the lower rank), as the dp balancer does; a rank over
its capacity gives its shortest local document back to the split ones. Any placement is
exact: attention never crosses a document, wherever the document sits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.attention import VarlenMeta
from parallel.layout import ShardedLayout, SPMeta
from parallel.sharding import SPLayout, doc_lengths, ranges


@dataclass(frozen=True)
class Placement:
    """Where each document of a micro-batch goes: owner[d] = SP rank, or -1 when split."""

    owner: tuple[int, ...]
    sp_size: int

    @property
    def split(self) -> list[int]:
        return [d for d, o in enumerate(self.owner) if o < 0]

    def local(self, rank: int) -> list[int]:
        return [d for d, o in enumerate(self.owner) if o == rank]


def split_local_tokens(split_lengths: list[int], ring: int, ulysses: int) -> int:
    """One rank's tokens of the split documents after `SPLayout`'s padding (each document to
    a multiple of 2R under ring, the whole to a multiple of U): the formula of SPLayout."""
    split_lengths = [n for n in split_lengths if n > 0]
    if not split_lengths:
        return 0
    if ring == 1:
        total = sum(split_lengths)
        return (total + (-total % ulysses)) // ulysses
    t_ring = sum(2 * -(-n // (2 * ring)) for n in split_lengths)
    pad = next(m for m in range(ulysses) if (t_ring + 2 * m) % ulysses == 0)
    return (t_ring + 2 * pad) // ulysses


def place_documents(
    lengths: list[int], threshold: int, ring: int, ulysses: int, capacity: int | None = None
) -> Placement:
    """Documents of at most `threshold` tokens stay whole on one of the ring x ulysses ranks
    (LPT on L^2, then tokens); longer ones (and empty ones, which hold nothing) are split
    over the ring x ulysses layout. Pure and deterministic: every rank gets the same answer.

    No rank holds more than `capacity` tokens (its local documents plus its share of the
    split ones; default: what the layout gives a rank when every document is split), so a
    placement never needs more activation memory than the fixed method the planner plans:
    while a rank is over, its shortest local document is split instead."""
    P = ring * ulysses
    if P < 1:
        raise ValueError(f"ring x ulysses must be >= 1, got {ring} x {ulysses}")
    if capacity is None:
        capacity = split_local_tokens(lengths, ring, ulysses)
    local = sorted((d for d, n in enumerate(lengths) if 0 < n <= threshold),
                   key=lambda d: (-lengths[d], d))  # fmt: skip
    while True:
        owner, tokens = _lpt(lengths, local, P)
        share = split_local_tokens([n for n, o in zip(lengths, owner) if o < 0], ring, ulysses)
        over = max(range(P), key=lambda r: (tokens[r], -r))
        if tokens[over] + share <= capacity:
            return Placement(tuple(owner), P)
        mine = [d for d in local if owner[d] == over]
        if not mine:  # every document split and still over: the batch does not fit
            raise ValueError(
                f"a micro-batch of {sum(lengths)} tokens in documents up to {max(lengths)} "
                f"needs {share} tokens per rank over ring x ulysses = {ring} x {ulysses}, "
                f"above the capacity of {capacity}: use more ranks or shorter sequences"
            )
        # Split the over-full rank's shortest document (it moves the least work), then
        # place the others again from scratch.
        local.remove(min(mine, key=lambda d: (lengths[d], -d)))


def _lpt(lengths: list[int], order: list[int], P: int) -> tuple[list[int], list[int]]:
    """Longest processing time first: each document of `order` (longest first) to the rank
    of least attention cost so far (L^2), then fewest tokens, then lowest rank. Returns
    (owner per document, -1 where not placed; tokens per rank)."""
    owner = [-1] * len(lengths)
    cost, tokens = [0] * P, [0] * P
    for d in order:
        rank = min(range(P), key=lambda r: (cost[r], tokens[r], r))
        owner[d] = rank
        cost[rank] += lengths[d] ** 2
        tokens[rank] += lengths[d]
    return owner, tokens


@dataclass
class AdaptiveSPMeta:
    """Attention metadata of one SP rank under adaptive placement: its first `num_local`
    tokens are whole documents (`local_meta`), the rest the split documents' shard
    (`split_meta`, None when no document is split)."""

    num_local: int
    local_meta: VarlenMeta
    split_meta: SPMeta | None
    ring_impl: str | None = None  # the split documents' ring layout; None: the module's
    _cache: dict = field(default_factory=dict, repr=False)

    def local_on(self, device) -> VarlenMeta:
        """`local_meta` with its boundaries on `device` (moved once per device)."""
        key = str(device)
        if key not in self._cache:
            m = self.local_meta
            self._cache[key] = VarlenMeta(
                m.cu_seqlens_q.to(device), m.cu_seqlens_k.to(device), m.max_seqlen_q,
                m.max_seqlen_k,
            )  # fmt: skip
        return self._cache[key]


def adaptive_local_index(
    cu_seqlens_N1: torch.Tensor,
    total_tokens: int,
    placement: Placement,
    ring: int,
    ulysses: int,
    sp_rank: int,
) -> tuple[torch.Tensor, AdaptiveSPMeta]:
    """(local_index_T [T_local] with -1 for padding, this rank's AdaptiveSPMeta)."""
    lengths = doc_lengths(cu_seqlens_N1, total_tokens)
    starts = cu_seqlens_N1.detach().to("cpu", torch.long)[:-1]
    mine = placement.local(sp_rank)
    own_len = lengths[mine] if mine else torch.zeros(0, dtype=torch.long)
    own_index = ranges(starts[mine], own_len) if mine else torch.zeros(0, dtype=torch.long)
    cu_local = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(own_len, 0)])
    longest = int(own_len.max()) if len(own_len) else 0
    local_meta = VarlenMeta(cu_local.to(torch.int32), cu_local.to(torch.int32), longest, longest)
    split = placement.split
    split_meta, split_index = None, torch.zeros(0, dtype=torch.long)
    if split and int(lengths[split].sum()) > 0:
        split_len = lengths[split]
        split_tokens = ranges(starts[split], split_len)  # batch index of each split token
        cu_split = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(split_len, 0)])
        layout = SPLayout(cu_split, int(split_len.sum()), ring, ulysses)
        ring_rank, ulysses_rank = divmod(sp_rank, ulysses)
        sub = layout.local_index(ring_rank, ulysses_rank)  # into the split documents
        split_index = torch.where(sub >= 0, split_tokens[sub.clamp(min=0)], -1)
        split_meta = SPMeta(layout, ring_rank, ulysses_rank)
    index = torch.cat([own_index, split_index])
    return index, AdaptiveSPMeta(len(own_index), local_meta, split_meta)


def shard_packed_adaptive(
    cu_seqlens_N1: torch.Tensor,
    total_tokens: int,
    placement: Placement,
    ring: int,
    ulysses: int,
    sp_rank: int,
    ring_impl: str | None = None,
) -> ShardedLayout:
    """`parallel.shard_packed` under adaptive placement: `placement`'s local documents whole
    on their ranks, the split ones in the ring x ulysses layout (`ring_impl`: the ring
    variant the split documents run with; None: the attention module's own)."""
    if placement.sp_size != ring * ulysses:
        raise ValueError(
            f"a placement over {placement.sp_size} ranks for ring x ulysses = {ring} x {ulysses}"
        )
    index, meta = adaptive_local_index(
        cu_seqlens_N1, total_tokens, placement, ring, ulysses, sp_rank
    )
    meta.ring_impl = ring_impl
    return ShardedLayout(index, meta, int((index < 0).sum()))


def adaptive_attn_varlen_func(
    ulysses_group,
    ring_group,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    meta: AdaptiveSPMeta,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    ring_impl: str = "zigzag",
    stats=None,
) -> torch.Tensor:
    """Attention of one SP rank's tokens under adaptive placement: its local documents with
    no communication, its share of the split documents through `usp_attn_varlen_func` (every
    rank takes part in that call or none does: the placement is the same everywhere).
    q_THD [T_local, Hq, D], k_TKD / v_TKD [T_local, K, D]; returns out [T_local, Hq, D]."""
    from kernels.attention import attn_varlen
    from parallel.usp import usp_attn_varlen_func

    n = meta.num_local
    lm = meta.local_on(q_THD.device)
    out_local, _ = attn_varlen(
        q_THD[:n], k_TKD[:n], v_TKD[:n], lm.cu_seqlens_q, lm.cu_seqlens_k, lm.max_seqlen_q,
        lm.max_seqlen_k, causal, softmax_scale, backend,
    )  # fmt: skip
    if meta.split_meta is None:
        return out_local
    out_split, _ = usp_attn_varlen_func(
        ulysses_group, ring_group, q_THD[n:], k_TKD[n:], v_TKD[n:], meta.split_meta,
        causal=causal, softmax_scale=softmax_scale, backend=backend,
        ring_impl=meta.ring_impl or ring_impl, stats=stats,
    )  # fmt: skip
    return torch.cat([out_local, out_split])


__all__ = [
    "AdaptiveSPMeta",
    "Placement",
    "adaptive_attn_varlen_func",
    "adaptive_local_index",
    "place_documents",
]
