"""Unified sequence parallelism (USP): Ulysses inside, ring across, on the 2-D SP mesh.

Legend: U Ulysses size (consecutive ranks: one node's fast links), R ring size (across
nodes), P = U R SP size, T_local = T_R / U tokens on this rank, T_R tokens on this ring rank,
Hq query heads, K KV heads, hq = Hq / U, hk = KV heads per rank after the Ulysses exchange,
D head dim.

    q, k, v (T_local, H, D) --Ulysses all-to-all--> (T_R, H/U, D)      [intra-node]
        --ring attention over R ranks (zigzag P2P or all-gather)--> (T_R, hq, D)  [inter-node]
        --Ulysses all-to-all--> out (T_local, Hq, D)

Ulysses moves all activations twice per layer and cannot overlap them, so it stays on the
fast intra-node links; the ring moves only K/V (of hk heads: U times less than without
Ulysses) and overlaps each transfer with a block of compute, so it tolerates the slow links.
Either degree may be 1: U == 1 is plain ring attention, R == 1 plain Ulysses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.attention import attn_varlen
from parallel.comm_stats import CommStats
from parallel.layout import SPMeta, check_method
from parallel.ring import ring_attn_varlen_func
from parallel.ring_allgather import ring_allgather_attn_varlen_func
from parallel.ulysses import ulysses_attn_varlen_func


def usp_attn_varlen_func(
    ulysses_group,
    ring_group,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    meta: SPMeta,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    ring_impl: str = "zigzag",
    stats: CommStats | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence-parallel attention of one SP rank's tokens (sharded by `shard_packed`).

    Args: ulysses_group (U ranks) and ring_group (R ranks) of this rank; q_THD
    [T_local, Hq, D], k_TKD / v_TKD [T_local, K, D]; meta, this rank's SPMeta; ring_impl
    zigzag | allgather (checked by `parallel.check_method`).
    Returns (out_THD [T_local, Hq, D], lse_HT [Hq, T_local] if return_lse else None);
    differentiable in q, k, v. Collectives per forward: 2 all-to-alls if U > 1, plus R-1 P2P
    exchanges (zigzag) or 1 all-gather (allgather) if R > 1.
    """
    check_method("usp", ring_impl)  # the one home of the ring_impl rule
    if not isinstance(meta, SPMeta):
        raise TypeError(
            f"sequence-parallel attention needs the SPMeta built by parallel.shard_packed, got "
            f"{type(meta).__name__}; shard the batch with parallel.shard_packed"
        )
    U, R = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    if (meta.layout.ulysses, meta.layout.ring) != (U, R):
        raise ValueError(
            f"the batch was sharded for ulysses={meta.layout.ulysses}, ring={meta.layout.ring} "
            f"but the groups have {U} and {R} ranks"
        )
    if q_THD.shape[0] != meta.layout.local_tokens:
        raise ValueError(
            f"q has {q_THD.shape[0]} tokens but this rank's shard has "
            f"{meta.layout.local_tokens}; build q from ShardedLayout.take"
        )
    device = q_THD.device

    def inner(q_gathered, k_gathered, v_gathered):
        # Attention of this ring rank's T_R tokens ([T_R, hq or hk, D]: what the Ulysses group
        # gathered) against the whole sequence.
        if R == 1:
            m = meta.gathered_meta(device)
            return attn_varlen(
                q_gathered,
                k_gathered,
                v_gathered,
                m.cu_seqlens_q,
                m.cu_seqlens_k,
                m.max_seqlen_q,
                m.max_seqlen_k,
                causal,
                softmax_scale,
                backend,
            )
        if ring_impl == "zigzag":
            plans = meta.zigzag_plans(causal, device)
            return ring_attn_varlen_func(
                ring_group, q_gathered, k_gathered, v_gathered, plans, softmax_scale, backend, stats
            )
        plan = meta.allgather_plan(causal, device)  # allgather: check_method allows no other
        return ring_allgather_attn_varlen_func(
            ring_group, q_gathered, k_gathered, v_gathered, plan, softmax_scale, backend, stats
        )

    if U == 1:
        out_THD, lse_HT = inner(q_THD, k_TKD, v_TKD)
        return out_THD, (lse_HT.detach() if return_lse else None)
    return ulysses_attn_varlen_func(
        ulysses_group, q_THD, k_TKD, v_TKD, inner, stats, return_lse=return_lse
    )


__all__ = ["usp_attn_varlen_func"]
