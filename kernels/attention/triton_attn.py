"""Triton backend of `attn_varlen`: flash attention over packed documents, with LSE.

Legend: T query tokens (all documents packed), S key tokens, H query heads, K key/value
heads (H % K == 0, GQA by indexing: KV is never repeated), D head dim, B documents.

Chain (FLA style): kernels in `triton_attn_kernels.py` -> `_launch_fwd` / `_launch_bwd`
(allocation-free launchers) -> `torch.library` custom ops `longtrain::triton_attn_fwd` /
`longtrain::triton_attn_bwd` (with fake implementations, so `torch.compile` traces through
them without a graph break) -> `triton_attn_fwd` / `triton_attn_bwd` (checked, no autograd;
what the `attn_varlen` dispatch calls) -> `TritonAttnFunction` -> `triton_attn_varlen`.

Inputs: float16 / bfloat16 (float32 accumulation) or float32 (exact `tl.dot`, for tests);
CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`. Outputs of tokens outside every
document (past cu_seqlens[-1]) are out 0, lse -inf and zero gradients.
"""

import math

import torch
import triton

from kernels._triton_utils import (
    check_dtype,
    check_triton_tensors,
    dot_precision,
    launch_meta,
)
from kernels.attention.triton_attn_kernels import (
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_preprocess_kernel,
    attn_fwd_kernel,
)

__all__ = ["TritonAttnFunction", "triton_attn_bwd", "triton_attn_fwd", "triton_attn_varlen"]

# Block sizes when not autotuning (the interpreter): small, so short test documents still span
# several blocks and every boundary case runs; the minimum `tl.dot` accepts is 16.
_DEFAULT_BLOCK_M = 16
_DEFAULT_BLOCK_N = 16
_MAX_HEAD_DIM = 256


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# ---------------------------------------------------------------------------------- launchers


def _launch_fwd(
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    causal: bool,
    softmax_scale: float,
    out_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    block_m: int = _DEFAULT_BLOCK_M,
    block_n: int = _DEFAULT_BLOCK_N,
) -> None:
    """Write out_THD and lse_HT (float32) of every token inside a document."""
    T, H, D = q_THD.shape
    B = cu_seqlens_q.numel() - 1
    if T == 0 or B == 0 or max_seqlen_q == 0:
        return
    meta = launch_meta(attn_fwd_kernel, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)

    def grid(META):
        return (triton.cdiv(max_seqlen_q, META["BLOCK_M"]), H, B)

    attn_fwd_kernel[grid](
        q_THD, k_SKD, v_SKD, out_THD, lse_HT, cu_seqlens_q, cu_seqlens_k,
        q_THD.stride(0), q_THD.stride(1), k_SKD.stride(0), k_SKD.stride(1),
        v_SKD.stride(0), v_SKD.stride(1), out_THD.stride(0), out_THD.stride(1),
        T, D, H // k_SKD.shape[1], softmax_scale,
        CAUSAL=causal, BLOCK_D=_block_d(D), PRECISION=dot_precision(q_THD.dtype), **meta,
    )  # fmt: skip


def _launch_bwd(
    dout_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    out_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dq_THD: torch.Tensor,
    dk_SKD: torch.Tensor,
    dv_SKD: torch.Tensor,
    dlse_HT: torch.Tensor | None = None,
    block_m: int = _DEFAULT_BLOCK_M,
    block_n: int = _DEFAULT_BLOCK_N,
) -> None:
    """Write dq, dk, dv of every token inside a document (dk/dv summed over each group);
    `dlse_HT` (float32, optional) is a gradient flowing into the lse output."""
    T, H, D = q_THD.shape
    K = k_SKD.shape[1]
    B = cu_seqlens_q.numel() - 1
    if T == 0 or B == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return
    block_d = _block_d(D)
    precision = dot_precision(q_THD.dtype)
    delta_HT = torch.empty((H, T), dtype=torch.float32, device=q_THD.device)
    attn_bwd_preprocess_kernel[(triton.cdiv(T, block_m), H)](
        out_THD, dout_THD, delta_HT if dlse_HT is None else dlse_HT, delta_HT,
        out_THD.stride(0), out_THD.stride(1), dout_THD.stride(0), dout_THD.stride(1), T, D,
        HAS_DLSE=dlse_HT is not None, BLOCK_M=block_m, BLOCK_D=block_d,
    )  # fmt: skip
    meta = launch_meta(attn_bwd_dkdv_kernel, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)

    def grid_kv(META):
        return (triton.cdiv(max_seqlen_k, META["BLOCK_N"]), K, B)

    attn_bwd_dkdv_kernel[grid_kv](
        q_THD, k_SKD, v_SKD, dout_THD, lse_HT, delta_HT, dk_SKD, dv_SKD,
        cu_seqlens_q, cu_seqlens_k,
        q_THD.stride(0), q_THD.stride(1), k_SKD.stride(0), k_SKD.stride(1),
        v_SKD.stride(0), v_SKD.stride(1), dout_THD.stride(0), dout_THD.stride(1),
        dk_SKD.stride(0), dk_SKD.stride(1), dv_SKD.stride(0), dv_SKD.stride(1),
        T, D, H // K, softmax_scale,
        CAUSAL=causal, BLOCK_D=block_d, PRECISION=precision, **meta,
    )  # fmt: skip
    meta = launch_meta(attn_bwd_dq_kernel, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)

    def grid_q(META):
        return (triton.cdiv(max_seqlen_q, META["BLOCK_M"]), H, B)

    attn_bwd_dq_kernel[grid_q](
        q_THD, k_SKD, v_SKD, dout_THD, lse_HT, delta_HT, dq_THD, cu_seqlens_q, cu_seqlens_k,
        q_THD.stride(0), q_THD.stride(1), k_SKD.stride(0), k_SKD.stride(1),
        v_SKD.stride(0), v_SKD.stride(1), dout_THD.stride(0), dout_THD.stride(1),
        dq_THD.stride(0), dq_THD.stride(1),
        T, D, H // K, softmax_scale,
        CAUSAL=causal, BLOCK_D=block_d, PRECISION=precision, **meta,
    )  # fmt: skip


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("longtrain::triton_attn_fwd", mutates_args=())
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
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    out_THD = torch.zeros_like(q)
    lse_HT = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    _launch_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, softmax_scale, out_THD, lse_HT
    )
    return out_THD, lse_HT


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("longtrain::triton_attn_bwd", mutates_args=())
def _bwd_op(
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
    causal: bool,
    softmax_scale: float,
    dlse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout, q, k, v, out = (_last_dim_contiguous(x) for x in (dout, q, k, v, out))
    lse = lse.float().contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _launch_bwd(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, softmax_scale, dq, dk, dv, dlse,
    )  # fmt: skip
    return dq, dk, dv


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, softmax_scale, dlse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ------------------------------------------------------------------------------ public API


def _check_inputs(
    name: str,
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> None:
    if q_THD.dim() != 3 or k_SKD.dim() != 3 or v_SKD.shape != k_SKD.shape:
        raise ValueError(
            f"{name}: expected q [T, H, D] and k, v [S, K, D] of one shape, got "
            f"{tuple(q_THD.shape)}, {tuple(k_SKD.shape)}, {tuple(v_SKD.shape)}"
        )
    H, D = q_THD.shape[1:]
    K = k_SKD.shape[1]
    if k_SKD.shape[2] != D or K == 0 or H % K:
        raise ValueError(
            f"{name}: q has {H} heads of dim {D}, k/v {K} heads of dim {k_SKD.shape[2]}: "
            f"head dims must agree and query heads be a multiple of key/value heads"
        )
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {D} > {_MAX_HEAD_DIM} is not supported")
    if not (q_THD.dtype == k_SKD.dtype == v_SKD.dtype):
        raise ValueError(
            f"{name}: q, k, v dtypes differ: {q_THD.dtype}, {k_SKD.dtype}, {v_SKD.dtype}"
        )
    check_dtype(name, q_THD.dtype)
    for label, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.numel() < 1 or cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: {label} must be a 1-D int32/int64 tensor [B + 1]")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{name}: cu_seqlens_q has {cu_seqlens_q.numel() - 1} documents, "
            f"cu_seqlens_k {cu_seqlens_k.numel() - 1}"
        )
    check_triton_tensors(name, q_THD, k_SKD, v_SKD, cu_seqlens_q, cu_seqlens_k)


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def triton_attn_fwd(
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward (no autograd).

    q_THD [T, H, D], k_SKD / v_SKD [S, K, D] (H % K == 0), cu_seqlens_q / _k [B + 1] int
    (from 0), max_seqlen_q / _k the longest document (must not be smaller than the truth).
    Returns (out_THD [T, H, D] in q's dtype, lse_HT [H, T] float32, natural log; a row that
    sees no key has out 0 and lse -inf). Causal is aligned bottom-right.
    """
    _check_inputs("triton_attn_fwd", q_THD, k_SKD, v_SKD, cu_seqlens_q, cu_seqlens_k)
    scale = _scale(softmax_scale, q_THD.shape[-1])
    return torch.ops.longtrain.triton_attn_fwd(
        q_THD, k_SKD, v_SKD, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        bool(causal), scale,
    )  # fmt: skip


def triton_attn_bwd(
    dout_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    out_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    dlse_HT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen attention backward (no autograd), recomputing P from (q, k, lse).

    dout_THD / out_THD [T, H, D], lse_HT [H, T] as returned by `triton_attn_fwd`; other
    arguments as there; dlse_HT [H, T] (optional) is the gradient of the lse output.
    Returns (dq_THD [T, H, D], dk_SKD [S, K, D], dv_SKD [S, K, D]) in the inputs' dtype;
    dk/dv are summed over the H / K query heads sharing each KV head.
    """
    _check_inputs("triton_attn_bwd", q_THD, k_SKD, v_SKD, cu_seqlens_q, cu_seqlens_k)
    if dout_THD.shape != q_THD.shape or out_THD.shape != q_THD.shape:
        raise ValueError(
            f"triton_attn_bwd: dout {tuple(dout_THD.shape)} and out {tuple(out_THD.shape)} "
            f"must have q's shape {tuple(q_THD.shape)}"
        )
    if lse_HT.shape != (q_THD.shape[1], q_THD.shape[0]):
        raise ValueError(
            f"triton_attn_bwd: lse must be [H, T] = {(q_THD.shape[1], q_THD.shape[0])}, "
            f"got {tuple(lse_HT.shape)}"
        )
    scale = _scale(softmax_scale, q_THD.shape[-1])
    return torch.ops.longtrain.triton_attn_bwd(
        dout_THD.to(q_THD.dtype), q_THD, k_SKD, v_SKD, out_THD, lse_HT, cu_seqlens_q,
        cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal), scale, dlse_HT,
    )  # fmt: skip


class TritonAttnFunction(torch.autograd.Function):
    """Autograd around the two custom ops; saves (q, k, v, out, lse), nothing quadratic.
    Both outputs are differentiable: a gradient of lse (ring attention's merge) is honoured."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, softmax_scale):
        out, lse = triton_attn_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, softmax_scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_q, max_k, causal, softmax_scale)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = triton_attn_bwd(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, dlse
        )
        return dq, dk, dv, None, None, None, None, None, None


def triton_attn_varlen(
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (in q, k, v) varlen attention on the Triton kernels.

    Shapes as `triton_attn_fwd`: q_THD [T, H, D], k_SKD / v_SKD [S, K, D] ->
    (out_THD [T, H, D], lse_HT [H, T] float32); both outputs carry gradients.
    """
    return TritonAttnFunction.apply(
        q_THD, k_SKD, v_SKD, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
        softmax_scale,
    )  # fmt: skip
