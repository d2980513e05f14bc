"""The one autograd chain of `attn_varlen`, for every backend.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), N documents, Hq query heads,
K key/value heads, D head dim.

Eager mode: `_AttnVarlenFunction`, a plain autograd.Function around the backend's fwd / bwd.
Under `torch.compiler.is_compiling()` the very same `_fwd_impl` / `_bwd_impl` run as the custom
ops `longtrain::attn_varlen_fwd` / `_bwd`: opaque to the compiler, with fake implementations
that only allocate the outputs. Eager skips the custom ops, whose first call imports
torch._dynamo (~1 s per process) and whose dispatch costs per call.

Which backend runs is decided inside `_fwd_impl` / `_bwd_impl`, from the tensors they really
get: while compiling, nothing here looks at devices (the fake tensors of torch.compile and of
the planner may stand for tensors elsewhere), and the backend checks its devices when it runs.

The lse output is differentiable too: its gradient adds dlse_i * P_ij to dS. A backend whose
backward takes `dlse_HT=` applies it itself; otherwise one more backward call with zero values
does (see `_lse_grad`), only when dlse is nonzero, e.g. when partial results are merged by
`merge_attn_partials` under autograd.
"""

import functools
import inspect

import torch

from kernels.attention.dispatch import backend_fns, resolve_backend
from kernels.precision import acc_dtype

__all__ = ["attn_backward", "attn_forward", "attn_with_grad"]


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, be):
    fwd, _ = backend_fns(resolve_backend(be, q.device, q.dtype))
    return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)


def _bwd_impl(dout, dlse, q, k, v, out, lse, *meta_and_backend):
    """(dq, dk, dv) for upstream gradients dout [Tq, Hq, D] and dlse [Hq, Tq] (None: zero)."""
    *meta, be = meta_and_backend
    _, bwd = backend_fns(resolve_backend(be, q.device, q.dtype))
    dout = torch.zeros_like(out) if dout is None else dout
    if dlse is not None and _takes_dlse(bwd):  # the backend handles an lse gradient itself
        return bwd(dout, q, k, v, out, lse, *meta, dlse_HT=dlse)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, *meta)
    if dlse is not None and bool(dlse.any()):
        dq_lse, dk_lse = _lse_grad(bwd, dlse, q, k, v, lse, meta)
        dq = (dq.to(lse.dtype) + dq_lse.to(lse.dtype)).to(q.dtype)
        dk = (dk.to(lse.dtype) + dk_lse.to(lse.dtype)).to(k.dtype)
    return dq, dk, dv


@functools.cache
def _takes_dlse(bwd) -> bool:
    return "dlse_HT" in inspect.signature(bwd).parameters


def _lse_grad(bwd, dlse_HT, q_THD, k_TKD, v_TKD, lse_HT, meta):
    """(dq, dk) from a gradient on lse: d lse_i / d S_ij = P_ij, so dS = P * dlse_i.

    A backward computes dS = P * (dout . v_j - rowsum(dout * out)). With v = 0, out = e_0 and
    dout = -dlse * e_0 that is P * dlse, so one more call of the same backend gives the terms.
    """
    T, H, D = q_THD.shape
    out_e0_THD = q_THD.new_zeros((T, H, D))
    out_e0_THD[..., 0] = 1
    dout_THD = q_THD.new_zeros((T, H, D))
    dout_THD[..., 0] = -dlse_HT.t()
    dq, dk, _ = bwd(dout_THD, q_THD, k_TKD, torch.zeros_like(v_TKD), out_e0_THD, lse_HT, *meta)
    return dq, dk


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *meta = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.meta = meta  # max_seqlen_q, max_seqlen_k, causal, softmax_scale, backend


def _grads(ctx, dout, dlse, bwd_fn):
    if dout is None and dlse is None:  # neither output was used
        return (None,) * 10
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = bwd_fn(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None, None


class _AttnVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)  # an unused out or lse arrives as None: no work
        output = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, dlse, _bwd_impl)


@torch.library.custom_op("longtrain::attn_varlen_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
        backend,
    )  # fmt: skip


@_fwd_op.register_fake
def _fwd_fake(q, k, v, *_meta):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("longtrain::attn_varlen_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(
        dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, backend,
    )  # fmt: skip


@_bwd_op.register_fake
def _bwd_fake(dout, dlse, q, k, v, *_rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_fwd_op.register_autograd(
    lambda ctx, dout, dlse: _grads(ctx, dout, dlse, _bwd_op), setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------------
# Entry points. Arguments: q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q (int),
# max_seqlen_k (int), causal (bool), softmax_scale (float), backend (a name in BACKENDS,
# `auto` included: it is resolved where the backend runs).
# ---------------------------------------------------------------------------------------------


def attn_with_grad(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse), differentiable in q, k, v (both outputs carry gradients)."""
    if torch.compiler.is_compiling():
        return _fwd_op(*args)
    return _AttnVarlenFunction.apply(*args)


def attn_forward(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) without autograd."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return _fwd_op(*args)
    return _fwd_impl(*args)


def attn_backward(dout, q, k, v, out, lse, *args) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) without autograd, from the forward's (out, lse) and the upstream dout."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return _bwd_op(dout, None, q, k, v, out, lse, *args)
    return _bwd_impl(dout, None, q, k, v, out, lse, *args)
