"""Variable-length causal/full attention over packed documents, returning the log-sum-exp.

Legend: T query tokens (documents packed), S key tokens, H query heads, K key/value heads
(H % K == 0), D head dim, B documents.

Chain (FLA style): backend fwd/bwd (`torch_blockwise`, `triton_attn`, `flash_attn_backend`,
the last two imported only when chosen) -> `attn_varlen_fwd` / `attn_varlen_bwd` (validation,
dispatch) -> autograd (`_AttnVarlenFunction` in eager mode; under torch.compile the same code
runs as the custom ops `longtrain::attn_varlen_fwd` / `_bwd`, opaque to the compiler, with
fake impls) -> `attn_varlen` -> `VarlenAttention` (the module the model calls).

The lse output is differentiable too: its gradient adds dlse_i * P_ij to dS. A backend whose
backward takes `dlse_HT=` applies it itself; otherwise one more backward call with zero values
does (see `_lse_grad`), only when dlse is nonzero, e.g. when partial results are merged by
`merge_attn_partials` under autograd.
"""

import functools
import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

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
    "merge_attn_partials",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton", "flash_attn")
_MODULES = {  # backend -> (module, forward function, backward function), imported lazily
    "torch": ("kernels.attention.torch_blockwise", "torch_attn_fwd", "torch_attn_bwd"),
    "triton": ("kernels.attention.triton_attn", "triton_attn_fwd", "triton_attn_bwd"),
    "flash_attn": ("kernels.attention.flash_attn_backend", "flash_attn_fwd", "flash_attn_bwd"),
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Looked up once (find_spec does not import it), so torch.compile sees a constant.
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn `backend` (one of BACKENDS) into a concrete backend for tensors on `device`.

    `auto`: flash_attn if importable and on CUDA, else triton on CUDA, else torch.
    Raises ValueError for an unknown name or flash_attn off CUDA.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    device_type = torch.device(device).type
    if backend == "auto":
        if device_type == "cuda":
            return "flash_attn" if _HAS_FLASH_ATTN else "triton"
        return "torch"
    if backend == "flash_attn" and device_type != "cuda":
        raise ValueError(f"attention backend 'flash_attn' needs CUDA tensors, got {device_type}")
    return backend


def _backend_fns(backend: str):
    module_name, fwd_name, bwd_name = _MODULES[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"attention backend {backend!r} needs {module_name}: {e}") from e
    return getattr(module, fwd_name), getattr(module, bwd_name)


def _check_cu_seqlens(name: str, cu: torch.Tensor) -> None:
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D [B + 1], got shape {tuple(cu.shape)}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")


def _check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    # Value checks read the tensor; skip them where that would sync a GPU or break a graph.
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{name} must run from 0 to {total} (the token count), got {bounds}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(
            f"{name} has a document of {max(lengths)} tokens > max_seqlen {max_seqlen}"
        )


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [T, H, D], [S, K, D], [S, K, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must match and share q's head dim "
            f"{q.shape[2]}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
            f"{tuple(cu_seqlens_k.shape)} must hold the same number of documents"
        )
    _check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    _check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)


def _softmax_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


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
    """Attention forward without autograd.

    Args: q [T, H, D], k / v [S, K, D]; cu_seqlens_q / _k [B + 1] (int32 or int64, from 0 to
    T / S); max_seqlen_* >= the longest document; causal aligns bottom-right (query i of Lq
    sees keys j <= i + Lk - Lq); softmax_scale defaults to 1 / sqrt(D); backend in BACKENDS.
    Returns (out [T, H, D] in q's dtype, lse [H, T] float32, float64 for float64 inputs);
    a query that sees no key gets out 0, lse -inf.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    fwd, _ = _backend_fns(resolve_backend(backend, q.device))
    return fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        _softmax_scale(q, softmax_scale),
    )


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

    Args: dout / out [T, H, D], lse [H, T]; the rest as `attn_varlen_fwd`.
    Returns (dq [T, H, D], dk [S, K, D], dv [S, K, D]) in the inputs' dtype.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape "
            f"{tuple(q.shape)}"
        )
    if lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must be [H, T] = {(q.shape[1], q.shape[0])}, got {tuple(lse.shape)}")
    _, bwd = _backend_fns(resolve_backend(backend, q.device))
    return bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        _softmax_scale(q, softmax_scale),
    )


# ----------------------------------------------------------------------------------------------
# Autograd: a plain autograd.Function in eager mode; under torch.compile the same functions run
# as custom ops (opaque to the compiler, with fake impls). Eager skips the custom op, whose
# first call imports torch._dynamo (~1 s per process) and whose dispatch costs per call.
# ----------------------------------------------------------------------------------------------


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, be):
    fwd, _ = _backend_fns(be)
    return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)


def _bwd_impl(dout, dlse, q, k, v, out, lse, *meta_and_backend):
    """(dq, dk, dv) for upstream gradients dout [T, H, D] and dlse [H, T] (None: zero)."""
    *meta, be = meta_and_backend
    _, bwd = _backend_fns(be)
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


def _lse_grad(bwd, dlse_HT, q, k, v, lse_HT, meta):
    """(dq, dk) from a gradient on lse: d lse_i / d S_ij = P_ij, so dS = P * dlse_i.

    A backward computes dS = P * (dout . v_j - rowsum(dout * out)). With v = 0, out = e_0 and
    dout = -dlse * e_0 that is P * dlse, so one more call of the same backend gives the terms.
    """
    T, H, D = q.shape
    out_e0_THD = q.new_zeros((T, H, D))
    out_e0_THD[..., 0] = 1
    dout_THD = q.new_zeros((T, H, D))
    dout_THD[..., 0] = -dlse_HT.t()
    dq, dk, _ = bwd(dout_THD, q, k, torch.zeros_like(v), out_e0_THD, lse_HT, *meta)
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
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


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

    Args: q [T, H, D], k / v [S, K, D] (GQA: H % K == 0, KV never repeated); cu_seqlens_q / _k
    [B + 1] int32/int64 document boundaries (from 0 to T / S, same B); max_seqlen_* bound the
    document lengths; causal aligns bottom-right when Lq != Lk; softmax_scale defaults to
    1 / sqrt(D); backend in BACKENDS (`auto` picks by device, see `resolve_backend`).
    Returns out [T, H, D] (q's dtype) and lse [H, T] (float32; float64 for float64 inputs).
    A query that sees no key gets out 0 and lse -inf. Raises ValueError on bad input.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args = (
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
        _softmax_scale(q, softmax_scale), resolve_backend(backend, q.device),
    )  # fmt: skip
    if torch.compiler.is_compiling():
        return _fwd_op(*args)
    return _AttnVarlenFunction.apply(*args)


@dataclass
class VarlenMeta:
    """Document boundaries of a packed batch: cu_seqlens_* [B + 1] int, max_seqlen_* ints."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


class VarlenAttention(nn.Module):
    """The attention call the model makes; `parallel.apply` swaps it for a sequence-parallel one.

    forward(q [T, H, D], k [S, K, D], v [S, K, D], meta: VarlenMeta, causal=True,
    softmax_scale=None) -> out [T, H, D].
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
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
