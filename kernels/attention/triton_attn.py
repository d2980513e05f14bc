"""Triton backend of `attn_varlen`: flash attention over packed documents, with LSE.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), N documents, Hq query heads,
K key/value heads (Hq % K == 0, GQA by indexing: KV is never repeated), D head dim.

Chain (FLA style): kernels in `triton_attn_fwd_kernels.py` / `triton_attn_bwd_kernels.py` ->
`_launch_fwd` / `_launch_bwd` (allocation-free launchers) -> `torch.library` custom ops
`longtrain::triton_attn_fwd` / `longtrain::triton_attn_bwd` (fake implementations for
torch.compile and the planner; selective checkpointing knows the forward op by name) ->
`triton_attn_fwd` / `triton_attn_bwd` (checked, no autograd) -> the one autograd chain of
every backend, `kernels.attention.autograd` -> `kernels.attention.attn_varlen`.

Inputs: float16 / bfloat16 (float32 accumulation) or float32 (exact `tl.dot`, for tests);
CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`, which the custom ops check when
they run (not while compiling: fake tensors never reach them). Outputs of tokens outside
every document (past cu_seqlens[-1]) are out 0, lse -inf and zero gradients.
"""

import math

import torch
import triton

from kernels._triton_utils import TRITON_DTYPES, check_triton_tensors, dot_precision, launch_meta
from kernels.attention.args import check_attn_args, default_softmax_scale
from kernels.attention.triton_attn_bwd_kernels import (
    attn_bwd_dkdv_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_preprocess_kernel,
)
from kernels.attention.triton_attn_fwd_kernels import attn_fwd_kernel

__all__ = ["triton_attn_bwd", "triton_attn_fwd"]

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
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
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
    T, Hq, D = q_THD.shape
    N = cu_seqlens_q.numel() - 1
    if T == 0 or N == 0 or max_seqlen_q == 0:
        return
    meta = launch_meta(attn_fwd_kernel, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)

    def grid(META):
        return (triton.cdiv(max_seqlen_q, META["BLOCK_M"]), Hq, N)

    attn_fwd_kernel[grid](
        q_THD, k_TKD, v_TKD, out_THD, lse_HT, cu_seqlens_q, cu_seqlens_k,
        q_THD.stride(0), q_THD.stride(1), k_TKD.stride(0), k_TKD.stride(1),
        v_TKD.stride(0), v_TKD.stride(1), out_THD.stride(0), out_THD.stride(1),
        T, D, Hq // k_TKD.shape[1], softmax_scale,
        CAUSAL=causal, BLOCK_D=_block_d(D), PRECISION=dot_precision(q_THD.dtype), **meta,
    )  # fmt: skip


def _launch_bwd(
    dout_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    out_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    dq_THD: torch.Tensor,
    dk_TKD: torch.Tensor,
    dv_TKD: torch.Tensor,
    dlse_HT: torch.Tensor | None = None,
    block_m: int = _DEFAULT_BLOCK_M,
    block_n: int = _DEFAULT_BLOCK_N,
) -> None:
    """Write dq, dk, dv of every token inside a document (dk/dv summed over each group);
    `dlse_HT` (float32, optional) is a gradient flowing into the lse output."""
    T, Hq, D = q_THD.shape
    K = k_TKD.shape[1]
    N = cu_seqlens_q.numel() - 1
    if T == 0 or N == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return
    block_d = _block_d(D)
    precision = dot_precision(q_THD.dtype)
    delta_HT = torch.empty((Hq, T), dtype=torch.float32, device=q_THD.device)
    attn_bwd_preprocess_kernel[(triton.cdiv(T, block_m), Hq)](
        out_THD, dout_THD, delta_HT if dlse_HT is None else dlse_HT, delta_HT,
        out_THD.stride(0), out_THD.stride(1), dout_THD.stride(0), dout_THD.stride(1), T, D,
        HAS_DLSE=dlse_HT is not None, BLOCK_M=block_m, BLOCK_D=block_d,
    )  # fmt: skip
    meta = launch_meta(attn_bwd_dkdv_kernel, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)

    def grid_kv(META):
        return (triton.cdiv(max_seqlen_k, META["BLOCK_N"]), K, N)

    attn_bwd_dkdv_kernel[grid_kv](
        q_THD, k_TKD, v_TKD, dout_THD, lse_HT, delta_HT, dk_TKD, dv_TKD,
        cu_seqlens_q, cu_seqlens_k,
        q_THD.stride(0), q_THD.stride(1), k_TKD.stride(0), k_TKD.stride(1),
        v_TKD.stride(0), v_TKD.stride(1), dout_THD.stride(0), dout_THD.stride(1),
        dk_TKD.stride(0), dk_TKD.stride(1), dv_TKD.stride(0), dv_TKD.stride(1),
        T, D, Hq // K, softmax_scale,
        CAUSAL=causal, BLOCK_D=block_d, PRECISION=precision, **meta,
    )  # fmt: skip
    meta = launch_meta(attn_bwd_dq_kernel, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)

    def grid_q(META):
        return (triton.cdiv(max_seqlen_q, META["BLOCK_M"]), Hq, N)

    attn_bwd_dq_kernel[grid_q](
        q_THD, k_TKD, v_TKD, dout_THD, lse_HT, delta_HT, dq_THD, cu_seqlens_q, cu_seqlens_k,
        q_THD.stride(0), q_THD.stride(1), k_TKD.stride(0), k_TKD.stride(1),
        v_TKD.stride(0), v_TKD.stride(1), dout_THD.stride(0), dout_THD.stride(1),
        dq_THD.stride(0), dq_THD.stride(1),
        T, D, Hq // K, softmax_scale,
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
    check_triton_tensors("triton_attn_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
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
    check_triton_tensors("triton_attn_bwd", dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
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


# ------------------------------------------------------------------------------ fwd / bwd


def triton_attn_fwd(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward (no autograd).

    q_THD [Tq, Hq, D], k_TKD / v_TKD [Tk, K, D] (Hq % K == 0, D <= 256), cu_seqlens_q / _k
    [N + 1] int (from 0), max_seqlen_q / _k the longest document (must not be smaller than the
    truth). Returns (out_THD [Tq, Hq, D] in q's dtype, lse_HT [Hq, Tq] float32, natural log; a
    row that sees no key has out 0 and lse -inf). Causal is aligned bottom-right.
    """
    check_attn_args(
        "triton_attn_fwd", q_THD, k_TKD, v_TKD, cu_seqlens_q, cu_seqlens_k,
        dtypes=TRITON_DTYPES, max_head_dim=_MAX_HEAD_DIM,
    )  # fmt: skip
    return torch.ops.longtrain.triton_attn_fwd(
        q_THD, k_TKD, v_TKD, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        bool(causal), default_softmax_scale(q_THD.shape[-1], softmax_scale),
    )  # fmt: skip


def triton_attn_bwd(
    dout_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
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

    dout_THD / out_THD [Tq, Hq, D], lse_HT [Hq, Tq] as returned by `triton_attn_fwd`; other
    arguments as there; dlse_HT [Hq, Tq] (optional) is the gradient of the lse output.
    Returns (dq_THD [Tq, Hq, D], dk_TKD [Tk, K, D], dv_TKD [Tk, K, D]) in the inputs' dtype;
    dk/dv are summed over the Hq / K query heads sharing each KV head.
    """
    check_attn_args(
        "triton_attn_bwd", q_THD, k_TKD, v_TKD, cu_seqlens_q, cu_seqlens_k,
        dtypes=TRITON_DTYPES, max_head_dim=_MAX_HEAD_DIM, dout_THD=dout_THD, out_THD=out_THD,
        lse_HT=lse_HT,
    )  # fmt: skip
    return torch.ops.longtrain.triton_attn_bwd(
        dout_THD.to(q_THD.dtype), q_THD, k_TKD, v_TKD, out_THD, lse_HT, cu_seqlens_q,
        cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal),
        default_softmax_scale(q_THD.shape[-1], softmax_scale), dlse_HT,
    )  # fmt: skip
