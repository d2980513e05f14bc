"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

Legend: P ranks in the Ulysses group; T tokens on this rank (its contiguous slice), so the
gathered sequence has P T tokens; Hq query heads, K KV heads, D head dim. After the exchange
a rank holds all P T tokens of hq = Hq / P query heads and hk KV heads (K / P, or 1 when K
heads are replicated: `dims.kv_heads_per_rank`). Names: `q_THD` this rank's slice; `_PTHD` a
send or receive buffer whose chunk j is for (or from) rank j; `_gathered` the gathered
sequence [P T, hq or hk, D] (lse: [hq, P T]).

    q, k, v (T, H, D) --all-to-all--> (P T, H/P, D) --attention--> (P T, hq, D)
                                                  --all-to-all--> out (T, Hq, D)

q, k and v travel in ONE all-to-all (each rank's part for rank j packed side by side), so a
forward issues exactly 2 all-to-alls and a backward 2 (dout in, dq/dk/dv back).
GQA: when K % P == 0 the KV heads are split like the query heads (hk = K / P), never
repeated. When K < P (P % K == 0), rank j needs the one KV head that its query heads
[j hq, (j+1) hq) use, head j K / P; each KV head is then sent to the P / K ranks that
need it and no more (hk = 1), and the backward sums the gradients of those copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from kernels.precision import acc_dtype
from parallel.comm import all_to_all
from parallel.comm_stats import CommStats
from parallel.dims import check_qkv, check_ulysses_heads


def _kv_for_dest(x_TKD: torch.Tensor, P: int) -> torch.Tensor:
    """(T, K, D) -> (T, P, hk, D): the KV heads each destination rank needs."""
    T, K, D = x_TKD.shape
    if K % P == 0:
        return x_TKD.view(T, P, K // P, D)
    # K < P: destination j gets KV head j K / P (one copy per rank that needs it).
    index = torch.arange(P, device=x_TKD.device) * K // P
    return x_TKD.index_select(1, index).view(T, P, 1, D)


def _kv_grad_from_dest(d_TPKD: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(T, P, hk, D) -> (T, K, D); replicated heads sum their copies' gradients."""
    T, P, hk, D = d_TPKD.shape
    if num_kv_heads % P == 0:
        return d_TPKD.reshape(T, num_kv_heads, D)
    index = torch.arange(P, device=d_TPKD.device) * num_kv_heads // P
    # Summed in the accumulator dtype (float32 for bf16): three or more copies of a head
    # would otherwise add a bf16 rounding per copy.
    d_TKD = d_TPKD.new_zeros((T, num_kv_heads, D), dtype=acc_dtype(d_TPKD.dtype))
    return d_TKD.index_add_(1, index, d_TPKD[:, :, 0].to(d_TKD.dtype)).to(d_TPKD.dtype)


class _SeqToHeads(torch.autograd.Function):
    """q (T, Hq, D), k, v (T, K, D) -> (P T, hq, D), (P T, hk, D), (P T, hk, D)."""

    @staticmethod
    def forward(ctx, q_THD, k_TKD, v_TKD, group, stats):
        P = dist.get_world_size(group)
        T, Hq, D = q_THD.shape
        hq = Hq // P
        k_TPKD, v_TPKD = _kv_for_dest(k_TKD, P), _kv_for_dest(v_TKD, P)
        hk = k_TPKD.shape[2]
        send_PTHD = q_THD.new_empty((P, T, hq + 2 * hk, D))
        send_PTHD[:, :, :hq] = q_THD.view(T, P, hq, D).transpose(0, 1)
        send_PTHD[:, :, hq : hq + hk] = k_TPKD.transpose(0, 1)
        send_PTHD[:, :, hq + hk :] = v_TPKD.transpose(0, 1)
        recv_PTHD = torch.empty_like(send_PTHD)
        all_to_all(group, recv_PTHD, send_PTHD, stats)  # (T, H, D) -> (P T, H/P, D), q k v
        qkv_gathered = recv_PTHD.view(P * T, hq + 2 * hk, D)  # sources in rank order = sequence
        ctx.group, ctx.stats, ctx.dims = group, stats, (P, T, Hq, k_TKD.shape[1], hq, hk, D)
        ctx.dtype, ctx.device = q_THD.dtype, q_THD.device
        return qkv_gathered[:, :hq], qkv_gathered[:, hq : hq + hk], qkv_gathered[:, hq + hk :]

    @staticmethod
    def backward(ctx, dq_gathered, dk_gathered, dv_gathered):
        P, T, Hq, K, hq, hk, D = ctx.dims
        send_gathered = torch.empty((P * T, hq + 2 * hk, D), dtype=ctx.dtype, device=ctx.device)
        for lo, hi, grad in (
            (0, hq, dq_gathered),
            (hq, hq + hk, dk_gathered),
            (hq + hk, hq + 2 * hk, dv_gathered),
        ):
            send_gathered[:, lo:hi] = 0 if grad is None else grad
        recv_PTHD = torch.empty_like(send_gathered).view(P, T, hq + 2 * hk, D)
        all_to_all(ctx.group, recv_PTHD, send_gathered.view(P, T, hq + 2 * hk, D), ctx.stats)
        # (P T, H/P, D) -> (T, H, D): chunk j holds head group j of our T tokens.
        recv_TPHD = recv_PTHD.transpose(0, 1)
        dq_THD = recv_TPHD[:, :, :hq].reshape(T, Hq, D)
        dk_TKD = _kv_grad_from_dest(recv_TPHD[:, :, hq : hq + hk], K)
        dv_TKD = _kv_grad_from_dest(recv_TPHD[:, :, hq + hk :], K)
        return dq_THD, dk_TKD, dv_TKD, None, None


class _HeadsToSeq(torch.autograd.Function):
    """out (P T, hq, D) -> (T, Hq, D)."""

    @staticmethod
    def forward(ctx, out_gathered, group, stats):
        P = dist.get_world_size(group)
        PT, hq, D = out_gathered.shape
        send_PTHD = out_gathered.contiguous().view(P, PT // P, hq, D)  # chunk j: rank j's tokens
        recv_PTHD = torch.empty_like(send_PTHD)
        all_to_all(group, recv_PTHD, send_PTHD, stats)  # (P T, H/P, D) -> (T, H, D)
        ctx.group, ctx.stats = group, stats
        # (P, T, hq, D) -> (T, P hq, D): head group j came from rank j.
        return recv_PTHD.transpose(0, 1).reshape(PT // P, P * hq, D)

    @staticmethod
    def backward(ctx, dout_THD):
        P = dist.get_world_size(ctx.group)
        T, Hq, D = dout_THD.shape
        send_PTHD = dout_THD.reshape(T, P, Hq // P, D).transpose(0, 1).contiguous()
        recv_PTHD = torch.empty_like(send_PTHD)
        all_to_all(ctx.group, recv_PTHD, send_PTHD, ctx.stats)  # (T, H, D) -> (P T, H/P, D)
        return recv_PTHD.view(P * T, Hq // P, D), None, None


def lse_to_seq(group, lse_gathered: torch.Tensor, stats: CommStats | None) -> torch.Tensor:
    """lse (hq, P T) -> (Hq, T), not differentiable (one more all-to-all; tests use it)."""
    P = dist.get_world_size(group)
    hq, PT = lse_gathered.shape
    send_PHT = lse_gathered.detach().view(hq, P, PT // P).transpose(0, 1).contiguous()
    recv_PHT = torch.empty_like(send_PHT)
    all_to_all(group, recv_PHT, send_PHT, stats)  # (H/P, P T) -> (H, T)
    return recv_PHT.view(P * hq, PT // P)


def ulysses_attn_varlen_func(
    group,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    inner: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple],
    stats: CommStats | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ulysses attention: gather the sequence, scatter heads, attend, and back.

    Args: group, the Ulysses process group (P ranks, consecutive); q_THD [T, Hq, D],
    k_TKD / v_TKD [T, K, D] this rank's contiguous slice of the sequence;
    inner(q [P T, hq, D], k [P T, hk, D], v [P T, hk, D]) -> (out [P T, hq, D],
    lse [hq, P T]), the attention over the gathered sequence (local varlen attention, or a
    ring for USP).
    Returns (out_THD [T, Hq, D], lse_HT [Hq, T] if return_lse else None).
    Differentiable in q, k, v. Collectives: 2 all-to-alls forward, 2 backward (+1 forward
    for return_lse). Raises ValueError for shapes or head counts P cannot split
    (`dims.check_ulysses_heads`, the rule `ParallelDims.validate` applies).
    """
    check_qkv("Ulysses", q_THD, k_TKD, v_TKD)
    check_ulysses_heads(q_THD.shape[1], k_TKD.shape[1], dist.get_world_size(group))
    q_gathered, k_gathered, v_gathered = _SeqToHeads.apply(
        q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous(), group, stats
    )
    out_gathered, lse_gathered = inner(q_gathered, k_gathered, v_gathered)
    out_THD = _HeadsToSeq.apply(out_gathered, group, stats)
    return out_THD, (lse_to_seq(group, lse_gathered, stats) if return_lse else None)


__all__ = ["lse_to_seq", "ulysses_attn_varlen_func"]
