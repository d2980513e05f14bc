"""Variable-length causal/full attention over packed documents, returning the log-sum-exp.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys where they differ), N documents,
Hq query heads, K key/value heads (Hq % K == 0), D head dim.

Chain (FLA style), one for every backend:
    backend fwd / bwd (`torch_blockwise`, `triton_attn`, `flash_attn_backend`,
    `torch_varlen_backend`; chosen and imported in `dispatch`)
    -> autograd (`autograd`: an autograd.Function in eager mode, the custom ops
       `longtrain::attn_varlen_fwd` / `_bwd` under torch.compile)
    -> `attn_varlen` (checks, softmax-scale default) -> `VarlenAttention` (the model's module).
`attn_varlen_fwd` / `attn_varlen_bwd` are the same calls without autograd (ring attention
drives them block by block). The argument rules live in `args`, once for every backend.
"""

from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention.args import (
    check_attn_args,
    check_cu_seqlens_values,
    default_softmax_scale,
)
from kernels.attention.autograd import attn_backward, attn_forward, attn_with_grad
from kernels.attention.dispatch import (
    BACKENDS,
    check_backend_name,
    describe_backend_choice,
    resolve_backend,
)
from kernels.attention.merge import merge_attn_partials
from kernels.attention.naive import attn_naive

__all__ = [
    "BACKENDS",
    "VarlenAttention",
    "VarlenMeta",
    "attn_naive",
    "attn_varlen",
    "attn_varlen_bwd",
    "attn_varlen_fwd",
    "describe_backend_choice",
    "merge_attn_partials",
    "resolve_backend",
]


def _checked_args(
    name, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
    backend, **grad_tensors,
):  # fmt: skip
    """Check the arguments of a public call; return them as the autograd entry points take
    them (ints, a bool, the scale as a float)."""
    check_backend_name(backend)
    check_attn_args(name, q, k, v, cu_seqlens_q, cu_seqlens_k, **grad_tensors)
    check_cu_seqlens_values(
        cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k
    )
    return (
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
        default_softmax_scale(q.shape[-1], softmax_scale), backend,
    )  # fmt: skip


def attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable variable-length attention: (out_THD, lse_HT), grads to q, k, v.

    Args: q [Tq, Hq, D], k / v [Tk, K, D] (GQA: Hq % K == 0, KV never repeated);
    cu_seqlens_q / _k [N + 1] int32/int64 document boundaries (from 0 to Tq / Tk, same N);
    max_seqlen_* bound the document lengths; causal aligns bottom-right when Lq != Lk (query
    i of Lq sees keys j <= i + Lk - Lq); softmax_scale defaults to 1 / sqrt(D); backend in
    BACKENDS (`auto` picks by device, see `resolve_backend`).
    Returns out [Tq, Hq, D] (q's dtype) and lse [Hq, Tq] (float32; float64 for float64
    inputs). A query that sees no key gets out 0 and lse -inf. Raises ValueError on bad input.
    """
    args = _checked_args(
        "attn_varlen", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, backend,
    )  # fmt: skip
    return attn_with_grad(*args)


def attn_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward without autograd: arguments and results as `attn_varlen`."""
    args = _checked_args(
        "attn_varlen_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, backend,
    )  # fmt: skip
    return attn_forward(*args)


def attn_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward without autograd, from the forward's (out, lse).

    Args: dout / out [Tq, Hq, D], lse [Hq, Tq]; the rest as `attn_varlen`.
    Returns (dq [Tq, Hq, D], dk [Tk, K, D], dv [Tk, K, D]) in the inputs' dtype.
    """
    q, k, v, *meta = _checked_args(
        "attn_varlen_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, backend, dout_THD=dout, out_THD=out, lse_HT=lse,
    )  # fmt: skip
    return attn_backward(dout, q, k, v, out, lse, *meta)


@dataclass
class VarlenMeta:
    """Document boundaries of a packed batch: cu_seqlens_* [N + 1] int, max_seqlen_* ints."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


class VarlenAttention(nn.Module):
    """The attention call the model makes; `parallel.apply` swaps it for a sequence-parallel one.

    forward(q [Tq, Hq, D], k [Tk, K, D], v [Tk, K, D], meta: VarlenMeta, causal=True,
    softmax_scale=None) -> out [Tq, Hq, D].
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        check_backend_name(backend)
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: VarlenMeta,
        causal: bool = True,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        out, _ = attn_varlen(
            q,
            k,
            v,
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.max_seqlen_k,
            causal,
            softmax_scale,
            self.backend,
        )
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
