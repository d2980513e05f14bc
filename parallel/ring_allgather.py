"""Ring-degree attention by all-gathering K/V (Llama 3 style context parallelism).

Legend: T tokens on this ring rank (T_R), Hq query heads, K KV heads, D head dim, R ring
size; `_picked` names the key rows picked for this rank's segments (plans.allgather_plan).

Forward: one all-gather of this rank's [2, T, K, D] K/V buffer gives every rank's blocks
([R, 2, T, K, D]); the keys each query segment sees are picked (per-rank cu_seqlens_q/k)
and one attention call computes this rank's output, with no LSE merge. Good for many short
documents: one call instead of R, each with its own tiny segments. Backward all-gathers K/V
again (holding the whole sequence's K/V between forward and backward would defeat the
memory savings), scatters dK/dV of the picked rows into the gathered shape, and
reduce-scatters them to their owners. The all-gather is not overlapped with compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.precision import acc_dtype
from parallel.comm import all_gather, reduce_scatter
from parallel.comm_stats import CommStats
from parallel.dims import check_qkv
from parallel.plans import BlockPlan
from parallel.ring import PartialMerger, block_bwd, block_fwd


def _gather_kv(group, k_TKD, v_TKD, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_all, v_all), each [R T, K, D] with ring ranks in order."""
    ring = dist.get_world_size(group)
    kv_2TKD = torch.stack([k_TKD, v_TKD])
    T, K, D = k_TKD.shape
    kv_R2TKD = kv_2TKD.new_empty((ring * 2, T, K, D))
    all_gather(group, kv_R2TKD, kv_2TKD, stats)  # (2, T, K, D) -> (R 2, T, K, D)
    kv_2RTKD = kv_R2TKD.view(ring, 2, T, K, D).transpose(0, 1)  # -> (2, R, T, K, D), a view
    return kv_2RTKD[0].reshape(ring * T, K, D), kv_2RTKD[1].reshape(ring * T, K, D)


class _AllGatherAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_THD, k_TKD, v_TKD, group, plan, softmax_scale, backend, stats):
        k_all, v_all = _gather_kv(group, k_TKD, v_TKD, stats)
        out_b, lse_b = block_fwd(q_THD, k_all, v_all, plan, softmax_scale, backend)
        merger = PartialMerger(q_THD.shape[0], q_THD, lse_b.dtype)
        merger.add(out_b, lse_b, plan.q_index)  # rows in no segment: out 0, lse -inf
        out_THD, lse_HT = merger.result(q_THD.dtype)
        ctx.save_for_backward(q_THD, k_TKD, v_TKD, out_THD, lse_HT)
        ctx.group, ctx.plan, ctx.scale, ctx.backend, ctx.stats = (
            group,
            plan,
            softmax_scale,
            backend,
            stats,
        )
        ctx.mark_non_differentiable(lse_HT)
        return out_THD, lse_HT

    @staticmethod
    def backward(ctx, dout_THD, _dlse):
        q_THD, k_TKD, v_TKD, out_THD, lse_HT = ctx.saved_tensors
        ring = dist.get_world_size(ctx.group)
        k_all, v_all = _gather_kv(ctx.group, k_TKD, v_TKD, ctx.stats)
        dq_b, dk_picked, dv_picked = block_bwd(
            dout_THD.contiguous(),
            q_THD,
            k_all,
            v_all,
            out_THD,
            lse_HT,
            ctx.plan,
            ctx.scale,
            ctx.backend,
        )
        T, K, D = k_TKD.shape
        acc = acc_dtype(k_TKD.dtype)
        if ctx.plan.q_index is None:
            dq_THD = dq_b
        else:
            dq_THD = torch.zeros_like(q_THD).index_copy_(0, ctx.plan.q_index, dq_b)
        # Picked key rows -> gathered layout (a row picked twice sums), then to the owners.
        dkv_2RTKD = torch.zeros((2, ring * T, K, D), dtype=acc, device=k_TKD.device)
        dkv_2RTKD[0].index_add_(0, ctx.plan.k_index, dk_picked.to(acc))
        dkv_2RTKD[1].index_add_(0, ctx.plan.k_index, dv_picked.to(acc))
        # (2, R T, K, D) -> (R, 2, T, K, D): rank r's chunk is contiguous for reduce-scatter.
        dkv_R2TKD = dkv_2RTKD.view(2, ring, T, K, D).transpose(0, 1).contiguous()
        dkv_2TKD = dkv_R2TKD.new_empty((2, T, K, D))
        reduce_scatter(ctx.group, dkv_2TKD, dkv_R2TKD.view(ring * 2, T, K, D), ctx.stats)
        return (
            dq_THD,
            dkv_2TKD[0].to(k_TKD.dtype),
            dkv_2TKD[1].to(v_TKD.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def ring_allgather_attn_varlen_func(
    group,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    plan: BlockPlan,
    softmax_scale: float | None = None,
    backend: str = "auto",
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather context-parallel attention of this rank's queries against every rank's keys.

    Args: group, the ring process group (R ranks); q_THD [T, Hq, D], k_TKD / v_TKD [T, K, D]
    in the per-document zigzag layout (sharding.SPLayout); plan, this rank's
    plans.allgather_plan, on q's device.
    Returns (out_THD [T, Hq, D] in q's dtype, lse_HT [Hq, T] float32, float64 for float64;
    not differentiable). Differentiable in q, k, v.
    """
    check_qkv("all-gather ring attention", q_THD, k_TKD, v_TKD)
    return _AllGatherAttn.apply(q_THD, k_TKD, v_TKD, group, plan, softmax_scale, backend, stats)


__all__ = ["ring_allgather_attn_varlen_func"]
