"""Which queries attend to which keys in each ring step: pure index math, no communication.

Legend: R ring degree, r this ring rank, s ring step, src = (r - s) mod R the rank whose K/V
block this rank holds at step s, c_d one document's chunk length, o_d its first local
position, L_d its real length, T_R tokens on a ring rank, N segments of one attention call.
A "segment" is one varlen document of an attention call: a contiguous run of queries and a
contiguous run of keys.

Per-document zigzag (sharding.SPLayout): ring rank r holds chunks r ("front") and 2R-1-r
("back") of every document, laid out [front | back]. For causal attention, step s of the
P2P ring needs only (the zigzag balance: every step is two chunk-pairs of work):
    s == 0     own block, causal in local order (front before back within a document);
    src <  r   all local queries  x  src's front chunk (every key precedes every query);
    src >  r   local back chunk   x  all of src's keys (likewise, no mask needed).
Each document's real tokens and its padding are separate segments (padding sees only
padding). Empty segments are dropped, so no attention call sees Lq == 0 or Lk == 0; rows
that a step does not cover keep lse -inf for that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.sharding import SPLayout, ranges


@dataclass(frozen=True)
class BlockPlan:
    """One attention call between this rank's queries and one block of keys.

    q_index [Tq] rows of the local queries used (None: all T_R, in order); k_index [Tk] rows
    of the key block used (None: all, in order; may repeat for the all-gather plan);
    cu_seqlens_q / _k [N + 1] int32: N segments over the selected rows; causal applies inside
    every segment, aligned bottom-right.
    """

    q_index: torch.Tensor | None
    k_index: torch.Tensor | None
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool

    @property
    def empty(self) -> bool:
        return self.cu_seqlens_q.numel() <= 1

    def to(self, device: torch.device | str) -> BlockPlan:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return BlockPlan(
            mv(self.q_index),
            mv(self.k_index),
            mv(self.cu_seqlens_q),
            mv(self.cu_seqlens_k),
            self.max_seqlen_q,
            self.max_seqlen_k,
            self.causal,
        )


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]).int()


def _index_or_none(index: torch.Tensor, total: int) -> torch.Tensor | None:
    """None when `index` is exactly 0..total-1 (the caller then skips a gather)."""
    if index.numel() == total and bool((index == torch.arange(total)).all()):
        return None
    return index


def make_plan(
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    k_start: torch.Tensor,
    k_len: torch.Tensor,
    causal: bool,
    q_total: int,
    k_total: int,
) -> BlockPlan:
    """A plan from segments: segment i pairs queries [q_start, q_start + q_len) with keys
    [k_start, k_start + k_len); segments where either side is empty are dropped."""
    keep = (q_len > 0) & (k_len > 0)
    q_start, q_len, k_start, k_len = q_start[keep], q_len[keep], k_start[keep], k_len[keep]
    return BlockPlan(
        q_index=_index_or_none(ranges(q_start, q_len), q_total),
        k_index=_index_or_none(ranges(k_start, k_len), k_total),
        cu_seqlens_q=_cu(q_len),
        cu_seqlens_k=_cu(k_len),
        max_seqlen_q=int(q_len.max()) if len(q_len) else 0,
        max_seqlen_k=int(k_len.max()) if len(k_len) else 0,
        causal=causal,
    )


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a0, b0, a1, b1, ...]: per document, its real segment then its padding segment."""
    return torch.stack([a, b], 1).flatten()


def zigzag_plans(layout: SPLayout, ring_rank: int, causal: bool) -> list[BlockPlan]:
    """The R block plans of the P2P ring for `ring_rank` (step s uses the block of rank
    (ring_rank - s) mod R)."""
    R, r = layout.ring, ring_rank
    o, c, slab, T = layout.local_start, layout.chunk, layout.slab, layout.ring_tokens
    front_r, back_r = layout.real_counts(r)
    real_r = front_r + back_r
    plans = []
    for s in range(R):
        src = (r - s) % R
        front_s, back_s = layout.real_counts(src)
        real_s = front_s + back_s
        if s == 0 or not causal:
            # All local queries x all of the block's keys; causal only on the own block.
            q_start, q_len = _interleave(o, o + real_r), _interleave(real_r, slab - real_r)
            k_start, k_len = _interleave(o, o + real_s), _interleave(real_s, slab - real_s)
            seg_causal = causal
        elif src < r:
            # All local queries x src's front chunk.
            q_start, q_len = _interleave(o, o + real_r), _interleave(real_r, slab - real_r)
            k_start, k_len = _interleave(o, o + front_s), _interleave(front_s, c - front_s)
            seg_causal = False
        else:
            # Local back chunk x all of src's keys.
            q_start, q_len = _interleave(o + c, o + c + back_r), _interleave(back_r, c - back_r)
            k_start, k_len = _interleave(o, o + real_s), _interleave(real_s, slab - real_s)
            seg_causal = False
        plans.append(make_plan(q_start, q_len, k_start, k_len, seg_causal, T, T))
    return plans


def allgather_plan(layout: SPLayout, ring_rank: int, causal: bool) -> BlockPlan:
    """One plan for this rank's queries against the all-gathered K/V ([R T_R], ring ranks in
    order, each in its local layout). Keys are picked in document order; under causal
    attention the front and back chunk of a document are separate segments, each seeing the
    prefix of its document up to its own end (so that prefix is picked twice: a local copy,
    never communication)."""
    R, r = layout.ring, ring_rank
    o, c, slab, L = layout.local_start, layout.chunk, layout.slab, layout.real_len
    front, back = layout.real_counts(r)
    real = front + back
    if causal and R > 1:
        end_f, end_b = (r + 1) * c, (2 * R - r) * c  # ends of the chunks in the document
        # Per document: front real, front pad, back real, back pad.
        q_start = torch.stack([o, o + front, o + c, o + c + back], 1).flatten()
        q_len = torch.stack([front, c - front, back, c - back], 1).flatten()
        zero = torch.zeros_like(L)
        k_from = torch.stack([zero, L, zero, L], 1).flatten()  # real keys from 0, pad from L
        k_to = torch.stack([end_f - c + front, end_f, end_b - c + back, end_b], 1).flatten()
        k_to = torch.maximum(k_to, k_from)
    else:
        end = layout.padded_len
        q_start, q_len = _interleave(o, o + real), _interleave(real, slab - real)
        zero = torch.zeros_like(L)
        k_from, k_to = _interleave(zero, L), _interleave(L, end)
    reps = q_len.numel() // len(L)
    doc_base = layout.padded_start.repeat_interleave(reps)
    keep = (q_len > 0) & (k_to > k_from)
    q_start, q_len = q_start[keep], q_len[keep]
    k_from, k_len = (k_from + doc_base)[keep], (k_to - k_from)[keep]
    plan = make_plan(q_start, q_len, k_from, k_len, causal, layout.ring_tokens, k_total=-1)
    # Keys address the padded sequence; map them to rows of the gathered buffer.
    return BlockPlan(
        plan.q_index,
        layout.padded_to_ring()[plan.k_index],
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        plan.max_seqlen_q,
        plan.max_seqlen_k,
        causal,
    )


__all__ = ["BlockPlan", "allgather_plan", "make_plan", "zigzag_plans"]
