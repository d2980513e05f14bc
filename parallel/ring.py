"""Ring attention over packed documents with per-document zigzag balance (P2P K/V rotation).

Legend: T tokens on this ring rank (T_R), Hq query heads, K KV heads, D head dim, R ring
size, s step, src = (rank - s) mod R the rank whose K/V block this rank holds at step s.

Forward: K and V travel as one [2, T, K, D] buffer. At every step the transfer of the next
block is committed before the current block is computed (it overlaps on GPU); the partial
(out, lse) of each block merges into float32 accumulators (float64 for float64 inputs) by
log-sum-exp. Which rows meet which keys at each step is precomputed (plans.zigzag_plans).
Backward: K/V rotate again; dQ accumulates locally; the dK/dV of the block in hand travel
with it one rank further each step (R hops in all), so after the loop each rank holds the
full gradient of its own K/V. Collectives per call: R-1 batched P2P exchanges forward,
(R-1) + R backward.
"""

from __future__ import annotations

import torch

from kernels.attention import attn_varlen_bwd, attn_varlen_fwd, merge_attn_partials
from kernels.precision import acc_dtype
from parallel.comm import RingComm
from parallel.comm_stats import CommStats
from parallel.dims import check_qkv
from parallel.plans import BlockPlan


def rows(x: torch.Tensor, index: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    return x if index is None else x.index_select(dim, index)


def block_fwd(q_THD, k_TKD, v_TKD, plan: BlockPlan, softmax_scale, backend):
    """Partial attention of the rows of `plan` against a key block: (out [Tq, Hq, D], lse
    [Hq, Tq]) over the selected rows only."""
    return attn_varlen_fwd(
        rows(q_THD, plan.q_index),
        rows(k_TKD, plan.k_index),
        rows(v_TKD, plan.k_index),
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        plan.max_seqlen_q,
        plan.max_seqlen_k,
        plan.causal,
        softmax_scale,
        backend,
    )


def block_bwd(dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_HT, plan, softmax_scale, backend):
    """Gradients of one block (dq [Tq, Hq, D], dk, dv [Tk, K, D] over the selected rows),
    given the final (merged) out and lse of the whole row."""
    return attn_varlen_bwd(
        rows(dout_THD, plan.q_index),
        rows(q_THD, plan.q_index),
        rows(k_TKD, plan.k_index),
        rows(v_TKD, plan.k_index),
        rows(out_THD, plan.q_index),
        rows(lse_HT, plan.q_index, dim=1),
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        plan.max_seqlen_q,
        plan.max_seqlen_k,
        plan.causal,
        softmax_scale,
        backend,
    )


class PartialMerger:
    """Accumulates per-block partials (out, lse) over subsets of T rows by log-sum-exp."""

    def __init__(self, num_rows: int, like_THD: torch.Tensor, lse_dtype: torch.dtype):
        self.shape = (num_rows, *like_THD.shape[1:])
        self.dtype = acc_dtype(like_THD.dtype)
        self.lse_dtype = lse_dtype
        self.device = like_THD.device
        self.out_THD: torch.Tensor | None = None
        self.lse_HT: torch.Tensor | None = None

    def _init(self) -> None:
        self.out_THD = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.lse_HT = torch.full(
            (self.shape[1], self.shape[0]), -torch.inf, dtype=self.lse_dtype, device=self.device
        )

    def add(self, out_b, lse_b, index: torch.Tensor | None) -> None:
        """Merge a partial over the rows `index` (None: all rows, in order)."""
        if self.out_THD is None and index is None:  # the first block covers every row
            self.out_THD, self.lse_HT = out_b.to(self.dtype), lse_b.to(self.lse_dtype)
            return
        if self.out_THD is None:
            self._init()
        if index is None:
            self.out_THD, self.lse_HT = merge_attn_partials(self.out_THD, self.lse_HT, out_b, lse_b)
            return
        out_m, lse_m = merge_attn_partials(
            self.out_THD.index_select(0, index), self.lse_HT.index_select(1, index), out_b, lse_b
        )
        self.out_THD.index_copy_(0, index, out_m)
        self.lse_HT.index_copy_(1, index, lse_m.to(self.lse_dtype))

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [T, H, D] in `dtype`, lse [H, T]); rows no block covered: out 0, lse -inf."""
        if self.out_THD is None:
            self._init()
        return self.out_THD.to(dtype), self.lse_HT


class _RingAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_THD, k_TKD, v_TKD, group, plans, softmax_scale, backend, stats):
        ring = len(plans)
        kv_2TKD = torch.stack([k_TKD, v_TKD])  # one buffer: one send/recv pair per step
        comm = RingComm(group, stats, tag=0)
        merger = PartialMerger(q_THD.shape[0], q_THD, acc_dtype(q_THD.dtype))
        for step, plan in enumerate(plans):
            if step + 1 < ring:
                kv_next = comm.send_recv(kv_2TKD)  # (T, K, D) from rank - 1, for step + 1
                comm.commit()
            if not plan.empty:
                out_b, lse_b = block_fwd(
                    q_THD, kv_2TKD[0], kv_2TKD[1], plan, softmax_scale, backend
                )
                merger.add(out_b, lse_b, plan.q_index)
            if step + 1 < ring:
                comm.wait()
                kv_2TKD = kv_next
        comm.assert_idle()
        out_THD, lse_HT = merger.result(q_THD.dtype)
        ctx.save_for_backward(q_THD, k_TKD, v_TKD, out_THD, lse_HT)
        ctx.group, ctx.plans, ctx.scale, ctx.backend, ctx.stats = (
            group,
            plans,
            softmax_scale,
            backend,
            stats,
        )
        ctx.mark_non_differentiable(lse_HT)
        return out_THD, lse_HT

    @staticmethod
    def backward(ctx, dout_THD, _dlse):
        q_THD, k_TKD, v_TKD, out_THD, lse_HT = ctx.saved_tensors
        plans, ring = ctx.plans, len(ctx.plans)
        acc = acc_dtype(q_THD.dtype)
        dout_THD = dout_THD.contiguous()
        dq_THD = torch.zeros(q_THD.shape, dtype=acc, device=q_THD.device)
        kv_2TKD = torch.stack([k_TKD, v_TKD])
        kv_comm = RingComm(ctx.group, ctx.stats, tag=0)
        dkv_comm = RingComm(ctx.group, ctx.stats, tag=1)
        dkv_recv = None
        for step, plan in enumerate(plans):
            if step + 1 < ring:
                kv_next = kv_comm.send_recv(kv_2TKD)
                kv_comm.commit()
            if step == 0:
                dkv_2TKD = torch.zeros(kv_2TKD.shape, dtype=acc, device=q_THD.device)
            else:
                dkv_comm.wait()  # dK/dV of this block, summed over the ranks before us
                dkv_2TKD = dkv_recv
            if not plan.empty:
                dq_b, dk_b, dv_b = block_bwd(
                    dout_THD,
                    q_THD,
                    kv_2TKD[0],
                    kv_2TKD[1],
                    out_THD,
                    lse_HT,
                    plan,
                    ctx.scale,
                    ctx.backend,
                )
                _add_rows(dq_THD, plan.q_index, dq_b)
                _add_rows(dkv_2TKD[0], plan.k_index, dk_b)
                _add_rows(dkv_2TKD[1], plan.k_index, dv_b)
            if ring > 1:
                dkv_recv = dkv_comm.send_recv(dkv_2TKD)  # on to the next holder of this block
                dkv_comm.commit()
            else:
                dkv_recv = dkv_2TKD
            if step + 1 < ring:
                kv_comm.wait()
                kv_2TKD = kv_next
        if ring > 1:
            dkv_comm.wait()  # after R hops, our own block's dK/dV is back home
        kv_comm.assert_idle()
        dkv_comm.assert_idle()
        return (
            dq_THD.to(q_THD.dtype),
            dkv_recv[0].to(k_TKD.dtype),
            dkv_recv[1].to(v_TKD.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _add_rows(acc_THD: torch.Tensor, index: torch.Tensor | None, x_THD: torch.Tensor) -> None:
    if index is None:
        acc_THD += x_THD
    else:
        acc_THD.index_add_(0, index, x_THD.to(acc_THD.dtype))


def ring_attn_varlen_func(
    group,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    plans: list[BlockPlan],
    softmax_scale: float | None = None,
    backend: str = "auto",
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zigzag ring attention of this rank's queries against every rank's keys.

    Args: group, the ring process group (R ranks); q_THD [T, Hq, D], k_TKD / v_TKD [T, K, D]
    this rank's tokens in the per-document zigzag layout (sharding.SPLayout); plans, the R
    block plans of this rank (plans.zigzag_plans), on q's device.
    Returns (out_THD [T, Hq, D] in q's dtype, lse_HT [Hq, T] float32, float64 for float64
    inputs; not differentiable). Differentiable in q, k, v.
    """
    check_qkv("ring attention", q_THD, k_TKD, v_TKD)
    if len(plans) != torch.distributed.get_world_size(group):
        raise ValueError(
            f"{len(plans)} block plans for a ring of "
            f"{torch.distributed.get_world_size(group)} ranks; build them for this group"
        )
    return _RingAttn.apply(
        q_THD, k_TKD.contiguous(), v_TKD.contiguous(), group, plans, softmax_scale, backend, stats
    )


__all__ = ["PartialMerger", "block_bwd", "block_fwd", "ring_attn_varlen_func"]
