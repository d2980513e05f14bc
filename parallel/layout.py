"""The trainer-facing side of sharding: `shard_packed` turns one packed micro-batch into this
rank's token indices and the attention metadata that the sequence-parallel module reads.

Legend: T tokens of the micro-batch, T_local tokens on this SP rank, T_R tokens on this
ring rank (what the Ulysses group gathers), N documents.

    layout = parallel.shard_packed(cu_seqlens_N1, T, dims, cfg)
    tokens = layout.take(tokens_T, pad_id)          # any valid id
    labels = layout.take(labels_T, -100)            # labels already shifted, per token
    position_ids = layout.take(position_ids_T, 0)
    weights = layout.take(loss_weights_T, 0.0)
    hidden = model(tokens, position_ids, layout.attn_meta, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.attention import VarlenMeta
from parallel.dims import ParallelDims
from parallel.plans import BlockPlan, allgather_plan, zigzag_plans
from parallel.sharding import SPLayout

METHODS = ("none", "ulysses", "ring", "usp", "auto")
RING_IMPLS = ("zigzag", "allgather")


def check_method(method: str, ring_impl: str) -> None:
    """ValueError unless `method` and `ring_impl` are ones this package implements: the one
    home of this rule (longtrain's config rules, `usp_attn_varlen_func` and `ring_cost` call
    it)."""
    if method not in METHODS:
        raise ValueError(f"parallel.method={method!r}; expected one of {', '.join(METHODS)}")
    if ring_impl not in RING_IMPLS:
        raise ValueError(
            f"parallel.ring_impl={ring_impl!r}; expected one of {', '.join(RING_IMPLS)}"
        )


def check_config(dims: ParallelDims, cfg) -> None:
    """ValueError unless cfg.method / cfg.ring_impl agree with the degrees of `dims`."""
    method = cfg.method
    check_method(method, getattr(cfg, "ring_impl", "zigzag"))
    u, r = dims.ulysses, dims.ring
    if method == "none" and u * r != 1:
        raise ValueError(f"parallel=none but ulysses={u}, ring={r}; pick ulysses, ring or usp")
    if method == "ulysses" and r != 1:
        raise ValueError(f"parallel=ulysses with ring={r}; use parallel=usp for both")
    if method == "ring" and u != 1:
        raise ValueError(f"parallel=ring with ulysses={u}; use parallel=usp for both")
    if method == "auto" and u != 1:  # its grid is the ring's; Ulysses is an extra view
        raise ValueError(f"parallel=auto runs on a ring grid, got ulysses={u}")


@dataclass
class SPMeta:
    """Attention metadata of one sharded micro-batch on one SP rank; the model passes it
    through untouched to the sequence-parallel attention module. Plans are built on first
    use per (causal, device) and cached."""

    layout: SPLayout
    ring_rank: int
    ulysses_rank: int
    _cache: dict = field(default_factory=dict, repr=False)

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def gathered_meta(self, device) -> VarlenMeta:
        """Documents of the T_R tokens a Ulysses group gathers (ring == 1: the whole padded
        sequence, each document's padding a document of its own)."""

        def build():
            cu = self.layout.ring_cu_seqlens(self.ring_rank)
            longest = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
            cu = cu.to(device=device, dtype=torch.int32)
            return VarlenMeta(cu, cu, longest, longest)

        return self._cached(("gathered", str(device)), build)

    def zigzag_plans(self, causal: bool, device) -> list[BlockPlan]:
        return self._cached(
            ("zigzag", causal, str(device)),
            lambda: [p.to(device) for p in zigzag_plans(self.layout, self.ring_rank, causal)],
        )

    def allgather_plan(self, causal: bool, device) -> BlockPlan:
        return self._cached(
            ("allgather", causal, str(device)),
            lambda: allgather_plan(self.layout, self.ring_rank, causal).to(device),
        )


@dataclass
class ShardedLayout:
    """This rank's part of a micro-batch.

    local_index_T [T_local] int64: the micro-batch token each local token is (-1: padding);
    attn_meta: what the model passes to attention (VarlenMeta without SP, SPMeta with it);
    num_padding: padding tokens on this rank (never attended to by real tokens, never
    trained on; count them in metrics).
    """

    local_index_T: torch.Tensor
    attn_meta: object
    num_padding: int

    def take(self, x_T: torch.Tensor, fill_value) -> torch.Tensor:
        """[T, ...] per-token tensor -> [T_local, ...]; padding gets `fill_value`."""
        idx = self.local_index_T.to(x_T.device)
        pad = idx < 0
        out = x_T.index_select(0, idx.clamp(min=0))
        if bool(pad.any()):
            out[pad] = fill_value
        return out


def shard_packed(
    cu_seqlens_N1: torch.Tensor,
    total_tokens: int,
    dims: ParallelDims,
    cfg,
    sp_rank: int | None = None,
) -> ShardedLayout:
    """Shard one packed micro-batch (`total_tokens` tokens, documents `cu_seqlens_N1`) for
    SP rank `sp_rank` (default: this process's, from the built mesh of `dims`).

    cfg has `method` (none | ulysses | ring | usp) and `ring_impl` (zigzag | allgather).
    ring == 1: contiguous slices (a padding document at the end makes T a multiple of
    ulysses); ring > 1: per-document zigzag over the ring, contiguous inside Ulysses.
    """
    check_config(dims, cfg)
    if cfg.method == "none":
        lengths = cu_seqlens_N1[1:] - cu_seqlens_N1[:-1]
        longest = int(lengths.max()) if lengths.numel() else 0
        cu = cu_seqlens_N1.to(torch.int32)
        return ShardedLayout(torch.arange(total_tokens), VarlenMeta(cu, cu, longest, longest), 0)
    if sp_rank is None:
        sp_rank = dims.sp_rank
    if not 0 <= sp_rank < dims.sp_size:
        raise ValueError(f"sp_rank {sp_rank} is outside 0..{dims.sp_size - 1}")
    ring_rank, ulysses_rank = divmod(sp_rank, dims.ulysses)
    layout = SPLayout(cu_seqlens_N1, total_tokens, dims.ring, dims.ulysses)
    index = layout.local_index(ring_rank, ulysses_rank)
    return ShardedLayout(index, SPMeta(layout, ring_rank, ulysses_rank), int((index < 0).sum()))


__all__ = ["METHODS", "RING_IMPLS", "SPMeta", "ShardedLayout", "check_config", "shard_packed"]
