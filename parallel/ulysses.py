"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

Legend: T tokens of the gathered sequence, P Ulysses size, T/P tokens on this rank, Hq query
heads, Hkv KV heads, hq = Hq / P and hk KV heads per rank after the exchange, D head dim.

    q, k, v (T/P, H, D) --all-to-all--> (T, H/P, D) --attention--> (T, hq, D)
                                                  --all-to-all--> out (T/P, Hq, D)

q, k and v travel in ONE all-to-all (each rank's part for rank j packed side by side), so a
forward issues exactly 2 all-to-alls and a backward 2 (dout in, dq/dk/dv back).
GQA: when Hkv % P == 0 the KV heads are split like the query heads (hk = Hkv / P), never
repeated. When Hkv < P (P % Hkv == 0), rank j needs the one KV head that its query heads
[j hq, (j+1) hq) use, head j Hkv / P; each KV head is then sent to the P / Hkv ranks that
need it and no more (hk = 1), and the backward sums the gradients of those copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel.comm import all_to_all
from parallel.comm_stats import CommStats


def check_heads(num_heads: int, num_kv_heads: int, degree: int) -> None:
    """ValueError unless `degree` splits the query heads and splits or replicates KV heads."""
    if num_heads % degree or (num_kv_heads % degree and degree % num_kv_heads):
        raise ValueError(
            f"Ulysses over {degree} ranks needs query heads ({num_heads}) divisible by {degree} "
            f"and KV heads ({num_kv_heads}) divisible by {degree} or dividing it; "
            f"see ParallelDims.validate for the valid degrees"
        )


def kv_heads_per_rank(num_kv_heads: int, degree: int) -> int:
    """hk: KV heads a rank holds after the exchange (1 when KV heads are replicated)."""
    return num_kv_heads // degree if num_kv_heads % degree == 0 else 1


def _kv_for_dest(x_TKD: torch.Tensor, degree: int) -> torch.Tensor:
    """(T/P, Hkv, D) -> (T/P, P, hk, D): the KV heads each destination rank needs."""
    Tl, Hkv, D = x_TKD.shape
    if Hkv % degree == 0:
        return x_TKD.view(Tl, degree, Hkv // degree, D)
    # Hkv < P: destination j gets KV head j Hkv / P (one copy per rank that needs it).
    index = torch.arange(degree, device=x_TKD.device) * Hkv // degree
    return x_TKD.index_select(1, index).view(Tl, degree, 1, D)


def _kv_grad_from_dest(d_TPhD: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(T/P, P, hk, D) -> (T/P, Hkv, D); replicated heads sum their copies' gradients."""
    Tl, degree, hk, D = d_TPhD.shape
    if num_kv_heads % degree == 0:
        return d_TPhD.reshape(Tl, num_kv_heads, D)
    index = torch.arange(degree, device=d_TPhD.device) * num_kv_heads // degree
    d_TKD = d_TPhD.new_zeros((Tl, num_kv_heads, D))
    return d_TKD.index_add_(1, index, d_TPhD[:, :, 0])


class _SeqToHeads(torch.autograd.Function):
    """q (T/P, Hq, D), k, v (T/P, Hkv, D) -> (T, hq, D), (T, hk, D), (T, hk, D)."""

    @staticmethod
    def forward(ctx, q_THD, k_TKD, v_TKD, group, stats):
        P = dist.get_world_size(group)
        Tl, Hq, D = q_THD.shape
        hq = Hq // P
        k_TPhD, v_TPhD = _kv_for_dest(k_TKD, P), _kv_for_dest(v_TKD, P)
        hk = k_TPhD.shape[2]
        send_PThD = q_THD.new_empty((P, Tl, hq + 2 * hk, D))
        send_PThD[:, :, :hq] = q_THD.view(Tl, P, hq, D).transpose(0, 1)
        send_PThD[:, :, hq : hq + hk] = k_TPhD.transpose(0, 1)
        send_PThD[:, :, hq + hk :] = v_TPhD.transpose(0, 1)
        recv_PThD = torch.empty_like(send_PThD)
        all_to_all(group, recv_PThD, send_PThD, stats)  # (T/P, H, D) -> (T, H/P, D), q k v
        qkv_ThD = recv_PThD.view(P * Tl, hq + 2 * hk, D)  # sources in rank order = sequence
        ctx.group, ctx.stats, ctx.dims = group, stats, (P, Tl, Hq, k_TKD.shape[1], hq, hk, D)
        ctx.dtype, ctx.device = q_THD.dtype, q_THD.device
        return qkv_ThD[:, :hq], qkv_ThD[:, hq : hq + hk], qkv_ThD[:, hq + hk :]

    @staticmethod
    def backward(ctx, dq_ThD, dk_ThD, dv_ThD):
        P, Tl, Hq, Hkv, hq, hk, D = ctx.dims
        send_ThD = torch.empty((P * Tl, hq + 2 * hk, D), dtype=ctx.dtype, device=ctx.device)
        for lo, hi, grad in (
            (0, hq, dq_ThD),
            (hq, hq + hk, dk_ThD),
            (hq + hk, hq + 2 * hk, dv_ThD),
        ):
            send_ThD[:, lo:hi] = 0 if grad is None else grad
        recv_PThD = torch.empty_like(send_ThD).view(P, Tl, hq + 2 * hk, D)
        all_to_all(ctx.group, recv_PThD, send_ThD.view(P, Tl, hq + 2 * hk, D), ctx.stats)
        # (T, H/P, D) -> (T/P, H, D): chunk j holds head group j of our T/P tokens.
        recv_TPhD = recv_PThD.transpose(0, 1)
        dq_THD = recv_TPhD[:, :, :hq].reshape(Tl, Hq, D)
        dk_TKD = _kv_grad_from_dest(recv_TPhD[:, :, hq : hq + hk], Hkv)
        dv_TKD = _kv_grad_from_dest(recv_TPhD[:, :, hq + hk :], Hkv)
        return dq_THD, dk_TKD, dv_TKD, None, None


class _HeadsToSeq(torch.autograd.Function):
    """out (T, hq, D) -> (T/P, Hq, D)."""

    @staticmethod
    def forward(ctx, out_ThD, group, stats):
        P = dist.get_world_size(group)
        T, hq, D = out_ThD.shape
        send_PThD = out_ThD.contiguous().view(P, T // P, hq, D)  # chunk j: rank j's tokens
        recv_PThD = torch.empty_like(send_PThD)
        all_to_all(group, recv_PThD, send_PThD, stats)  # (T, H/P, D) -> (T/P, H, D)
        ctx.group, ctx.stats = group, stats
        # (P, T/P, hq, D) -> (T/P, P hq, D): head group j came from rank j.
        return recv_PThD.transpose(0, 1).reshape(T // P, P * hq, D)

    @staticmethod
    def backward(ctx, dout_THD):
        P = dist.get_world_size(ctx.group)
        Tl, Hq, D = dout_THD.shape
        send_PThD = dout_THD.reshape(Tl, P, Hq // P, D).transpose(0, 1).contiguous()
        recv_PThD = torch.empty_like(send_PThD)
        all_to_all(ctx.group, recv_PThD, send_PThD, ctx.stats)  # (T/P, H, D) -> (T, H/P, D)
        return recv_PThD.view(P * Tl, Hq // P, D), None, None


def lse_to_seq(group, lse_HT: torch.Tensor, stats: CommStats | None) -> torch.Tensor:
    """lse (hq, T) -> (Hq, T/P), not differentiable (one more all-to-all; tests use it)."""
    P = dist.get_world_size(group)
    hq, T = lse_HT.shape
    send_PHT = lse_HT.detach().view(hq, P, T // P).transpose(0, 1).contiguous()
    recv_PHT = torch.empty_like(send_PHT)
    all_to_all(group, recv_PHT, send_PHT, stats)  # (H/P, T) -> (H, T/P)
    return recv_PHT.view(P * hq, T // P)


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

    Args: group, the Ulysses process group (P ranks, consecutive); q_THD [T/P, Hq, D],
    k_TKD / v_TKD [T/P, Hkv, D] this rank's contiguous slice of the sequence;
    inner(q [T, hq, D], k [T, hk, D], v [T, hk, D]) -> (out [T, hq, D], lse [hq, T]), the
    attention over the gathered sequence (local varlen attention, or a ring for USP).
    Returns (out_THD [T/P, Hq, D], lse_HT [Hq, T/P] if return_lse else None).
    Differentiable in q, k, v. Collectives: 2 all-to-alls forward, 2 backward (+1 forward
    for return_lse).
    """
    if q_THD.dim() != 3 or k_TKD.shape != v_TKD.shape or k_TKD.shape[0] != q_THD.shape[0]:
        raise ValueError(
            f"Ulysses needs q [T, Hq, D] and k, v [T, Hkv, D] with the same T, got "
            f"{tuple(q_THD.shape)}, {tuple(k_TKD.shape)}, {tuple(v_TKD.shape)}"
        )
    check_heads(q_THD.shape[1], k_TKD.shape[1], dist.get_world_size(group))
    q_ThD, k_ThD, v_ThD = _SeqToHeads.apply(
        q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous(), group, stats
    )
    out_ThD, lse_hT = inner(q_ThD, k_ThD, v_ThD)
    out_THD = _HeadsToSeq.apply(out_ThD, group, stats)
    return out_THD, (lse_to_seq(group, lse_hT, stats) if return_lse else None)


__all__ = ["check_heads", "kv_heads_per_rank", "lse_to_seq", "ulysses_attn_varlen_func"]
