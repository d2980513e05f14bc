"""Apply sequence parallelism to a model from outside: swap every
`kernels.attention.VarlenAttention` for `SPAttention`. The model file never changes; it
passes `attn_meta` through, and with SP that is the `SPMeta` of `parallel.shard_packed`.

Legend: T_local tokens on this rank, Hq query heads, K KV heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.attention import VarlenAttention
from parallel.adaptive import AdaptiveSPMeta, adaptive_attn_varlen_func
from parallel.comm_stats import CommStats
from parallel.dims import ParallelDims
from parallel.layout import check_config
from parallel.usp import usp_attn_varlen_func


class SPAttention(nn.Module):
    """Drop-in for VarlenAttention under sequence parallelism (Ulysses, ring, or USP).

    forward(q [T_local, Hq, D], k / v [T_local, K, D], meta: SPMeta (or AdaptiveSPMeta:
    whole documents first, then the split ones), causal=True, softmax_scale=None)
    -> out [T_local, Hq, D].
    """

    def __init__(
        self,
        method: str,
        ring_impl: str,
        ulysses_group,
        ring_group,
        backend: str = "auto",
        stats: CommStats | None = None,
        views: dict | None = None,
    ):
        super().__init__()
        self.method, self.ring_impl, self.backend = method, ring_impl, backend
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.stats = stats
        # (ulysses, ring) degrees -> (ulysses group, ring group) over this module's SP ranks:
        # the layouts adaptive placement may split documents with (parallel=auto: several).
        self.views = dict(views or {})

    # Collectives inside custom autograd Functions do not trace; a compiled block runs
    # this call eagerly (one graph break per layer) instead of failing.
    @torch.compiler.disable
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta,
        causal: bool = True,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        if isinstance(meta, AdaptiveSPMeta):  # whole documents here, the rest split
            groups = (self.ulysses_group, self.ring_group)
            if meta.split_meta is not None:
                layout = meta.split_meta.layout
                groups = self.views.get((layout.ulysses, layout.ring), groups)
            return adaptive_attn_varlen_func(
                *groups, q, k, v, meta, causal=causal, softmax_scale=softmax_scale,
                backend=self.backend, ring_impl=self.ring_impl, stats=self.stats,
            )  # fmt: skip
        out, _ = usp_attn_varlen_func(
            self.ulysses_group,
            self.ring_group,
            q,
            k,
            v,
            meta,
            causal=causal,
            softmax_scale=softmax_scale,
            backend=self.backend,
            ring_impl=self.ring_impl,
            stats=self.stats,
        )
        return out

    def extra_repr(self) -> str:
        return f"method={self.method}, ring_impl={self.ring_impl}, backend={self.backend}"


def apply(model: nn.Module, dims: ParallelDims, cfg, stats: CommStats | None = None) -> nn.Module:
    """Replace every VarlenAttention of `model` (in place) by an SPAttention over the groups
    of `dims` (whose mesh must be built). cfg has `method` (none | ulysses | ring | usp |
    auto) and `ring_impl` (zigzag | allgather); method none leaves the model alone. All
    swapped modules share `stats` (a new CommStats when None; read it back as
    `model.sp_comm_stats`).
    `dims.alternate` (built too, when set) is another layout adaptive placement may split
    documents with over the same ranks (parallel=auto: Ulysses beside the ring).
    Returns the model.
    """
    check_config(dims, cfg)
    if cfg.method == "none":
        return model
    stats = CommStats() if stats is None else stats
    ulysses_group, ring_group = dims.ulysses_group, dims.ring_group
    views = {(d.ulysses, d.ring): (d.ulysses_group, d.ring_group)
             for d in (dims, dims.alternate) if d is not None}  # fmt: skip
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, VarlenAttention):
                sp = SPAttention(
                    cfg.method,
                    getattr(cfg, "ring_impl", "zigzag"),
                    ulysses_group,
                    ring_group,
                    backend=child.backend,
                    stats=stats,
                    views=views,
                )
                setattr(parent, name, sp)
                swapped += 1
    if swapped == 0:
        raise ValueError(
            f"parallel.apply found no kernels.attention.VarlenAttention in "
            f"{type(model).__name__}; the model must call attention through it"
        )
    model.sp_comm_stats = stats
    return model


__all__ = ["SPAttention", "apply"]
