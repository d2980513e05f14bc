"""LSE merge of two partial attention results, in Triton (forward and backward).

Legend (kernels/__init__.py): T query tokens, Hq query heads (H in names), D head dim; added
here: BT a block of tokens, BD the head dim padded to a power of two.

Same semantics as the torch `merge_attn_partials` (kernels/attention/merge.py), the reference:
    lse = log(exp(lse_a) + exp(lse_b)),  out = w_a * out_a + w_b * out_b,  w_x = exp(lse_x - lse)
with a finite shift, so a side with lse -inf weighs 0 and two -inf sides give out 0, lse -inf
(and zero gradients). Math in float32, float64 when an input is float64.
Backward, with dlse the gradient of the merged lse (w_a + w_b = 1 where a row saw a key):
    d out_x = w_x * dout,   d lse_a = w_a * (w_b * sum_d dout * (out_a - out_b) + dlse)
and symmetrically for b. This is w_a * (sum_d dout * (out_a - out) + dlse) with the merged out
expanded, so the rounded merged output (16-bit for 16-bit partials) is never read back.

Chain: kernels -> custom ops `longtrain::triton_merge_fwd` / `_bwd` (fake impls for
torch.compile) -> `TritonMergeFunction` -> `triton_merge_attn_partials`.
"""

import torch
import triton
import triton.language as tl

from kernels._triton_utils import check_triton_tensors
from kernels.precision import acc_dtype

__all__ = ["TritonMergeFunction", "triton_merge_attn_partials"]

_BLOCK_T = 16


@triton.jit
def _merge_weights(lse_a_ptr, lse_b_ptr, lse_off, t_mask, COMPUTE: tl.constexpr):
    """(w_a, w_b, lse, seen) of a block of rows, -inf safe."""
    lse_a = tl.load(lse_a_ptr + lse_off, mask=t_mask, other=float("-inf")).to(COMPUTE)
    lse_b = tl.load(lse_b_ptr + lse_off, mask=t_mask, other=float("-inf")).to(COMPUTE)
    lse_max = tl.maximum(lse_a, lse_b)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max).to(COMPUTE)
    w_a = tl.exp(lse_a - shift)
    w_b = tl.exp(lse_b - shift)
    total = w_a + w_b
    seen = total > 0
    safe_total = tl.where(seen, total, 1.0).to(COMPUTE)
    lse = tl.where(seen, shift + tl.log(safe_total), float("-inf"))
    return w_a / safe_total, w_b / safe_total, lse


@triton.jit
def merge_fwd_kernel(
    out_a_ptr,
    lse_a_ptr,
    out_b_ptr,
    lse_b_ptr,
    out_ptr,
    lse_ptr,
    stride_at,
    stride_ah,
    stride_bt,
    stride_bh,
    stride_ot,
    stride_oh,
    T,
    head_dim,
    COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < T
    td_mask = t_mask[:, None] & (offs_d < head_dim)[None, :]
    lse_off = h.to(tl.int64) * T + offs_t
    w_a, w_b, lse = _merge_weights(lse_a_ptr, lse_b_ptr, lse_off, t_mask, COMPUTE)
    rows = offs_t[:, None]
    out_a = tl.load(out_a_ptr + rows * stride_at + h * stride_ah + offs_d[None, :], mask=td_mask)
    out_b = tl.load(out_b_ptr + rows * stride_bt + h * stride_bh + offs_d[None, :], mask=td_mask)
    out = w_a[:, None] * out_a.to(COMPUTE) + w_b[:, None] * out_b.to(COMPUTE)
    tl.store(
        out_ptr + rows * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=td_mask,
    )
    tl.store(lse_ptr + lse_off, lse.to(lse_ptr.dtype.element_ty), mask=t_mask)


@triton.jit
def merge_bwd_kernel(
    dout_ptr,
    dlse_ptr,
    out_a_ptr,
    lse_a_ptr,
    out_b_ptr,
    lse_b_ptr,
    dout_a_ptr,
    dlse_a_ptr,
    dout_b_ptr,
    dlse_b_ptr,
    stride_t,
    stride_h,
    T,
    head_dim,
    COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """All [T, H, D] tensors here share one contiguous layout (the launcher ensures it)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < T
    td_mask = t_mask[:, None] & (offs_d < head_dim)[None, :]
    lse_off = h.to(tl.int64) * T + offs_t
    w_a, w_b, _ = _merge_weights(lse_a_ptr, lse_b_ptr, lse_off, t_mask, COMPUTE)
    off = offs_t[:, None] * stride_t + h * stride_h + offs_d[None, :]
    dout = tl.load(dout_ptr + off, mask=td_mask, other=0.0).to(COMPUTE)
    out_a = tl.load(out_a_ptr + off, mask=td_mask, other=0.0).to(COMPUTE)
    out_b = tl.load(out_b_ptr + off, mask=td_mask, other=0.0).to(COMPUTE)
    dlse = tl.load(dlse_ptr + lse_off, mask=t_mask, other=0.0).to(COMPUTE)
    gap = tl.sum(dout * (out_a - out_b), 1)
    dlse_a = w_a * (w_b * gap + dlse)
    dlse_b = w_b * (dlse - w_a * gap)
    tl.store(dout_a_ptr + off, (w_a[:, None] * dout).to(dout_a_ptr.dtype.element_ty), td_mask)
    tl.store(dout_b_ptr + off, (w_b[:, None] * dout).to(dout_b_ptr.dtype.element_ty), td_mask)
    tl.store(dlse_a_ptr + lse_off, dlse_a.to(dlse_a_ptr.dtype.element_ty), mask=t_mask)
    tl.store(dlse_b_ptr + lse_off, dlse_b.to(dlse_b_ptr.dtype.element_ty), mask=t_mask)


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(T: int, Hq: int) -> tuple[int, int]:
    return (triton.cdiv(T, _BLOCK_T), Hq)


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(max(head_dim, 1))


@torch.library.custom_op("longtrain::triton_merge_fwd", mutates_args=())
def _fwd_op(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_tensors("triton_merge_attn_partials", out_a, lse_a, out_b, lse_b)
    T, Hq, D = out_a.shape
    compute = acc_dtype(out_a.dtype, lse_a.dtype, out_b.dtype, lse_b.dtype)
    out_a, out_b = out_a.contiguous(), out_b.contiguous()
    lse_a, lse_b = lse_a.contiguous(), lse_b.contiguous()
    out = torch.empty_like(out_a)
    lse = torch.empty((Hq, T), dtype=compute, device=out_a.device)
    if T > 0 and Hq > 0:
        merge_fwd_kernel[_grid(T, Hq)](
            out_a, lse_a, out_b, lse_b, out, lse, out_a.stride(0), out_a.stride(1),
            out_b.stride(0), out_b.stride(1), out.stride(0), out.stride(1), T, D,
            COMPUTE=_tl_dtype(compute), BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(D),
        )  # fmt: skip
    return out, lse


@_fwd_op.register_fake
def _(out_a, lse_a, out_b, lse_b):
    compute = acc_dtype(out_a.dtype, lse_a.dtype, out_b.dtype, lse_b.dtype)
    T, Hq, _ = out_a.shape
    return torch.empty_like(out_a), out_a.new_empty((Hq, T), dtype=compute)


@torch.library.custom_op("longtrain::triton_merge_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_tensors("triton_merge_attn_partials", dout, dlse, out_a, lse_a, out_b, lse_b)
    T, Hq, D = out_a.shape
    compute = acc_dtype(out_a.dtype, lse_a.dtype, out_b.dtype, lse_b.dtype)
    dout, out_a, out_b = (x.contiguous() for x in (dout, out_a, out_b))
    dlse, lse_a, lse_b = (x.contiguous() for x in (dlse, lse_a, lse_b))
    dout_a, dout_b = torch.empty_like(out_a), torch.empty_like(out_b)
    dlse_a = torch.empty(lse_a.shape, dtype=lse_a.dtype, device=lse_a.device)
    dlse_b = torch.empty(lse_b.shape, dtype=lse_b.dtype, device=lse_b.device)
    if T > 0 and Hq > 0:
        merge_bwd_kernel[_grid(T, Hq)](
            dout, dlse, out_a, lse_a, out_b, lse_b, dout_a, dlse_a, dout_b, dlse_b,
            out_a.stride(0), out_a.stride(1), T, D,
            COMPUTE=_tl_dtype(compute), BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(D),
        )  # fmt: skip
    return dout_a, dlse_a, dout_b, dlse_b


@_bwd_op.register_fake
def _(dout, dlse, out_a, lse_a, out_b, lse_b):
    return (
        torch.empty_like(out_a),
        torch.empty_like(lse_a),
        torch.empty_like(out_b),
        torch.empty_like(lse_b),
    )


class TritonMergeFunction(torch.autograd.Function):
    """Autograd around the merge ops; saves the four inputs."""

    @staticmethod
    def forward(ctx, out_a, lse_a, out_b, lse_b):
        out, lse = torch.ops.longtrain.triton_merge_fwd(out_a, lse_a, out_b, lse_b)
        ctx.save_for_backward(out_a, lse_a, out_b, lse_b)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        out_a, lse_a, out_b, lse_b = ctx.saved_tensors
        dout_a, dlse_a, dout_b, dlse_b = torch.ops.longtrain.triton_merge_bwd(
            dout.to(out_a.dtype), dlse, out_a, lse_a, out_b, lse_b
        )
        return dout_a, dlse_a, dout_b, dlse_b


def triton_merge_attn_partials(
    out_a_THD: torch.Tensor,
    lse_a_HT: torch.Tensor,
    out_b_THD: torch.Tensor,
    lse_b_HT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partials over disjoint key sets (Triton; differentiable in all four inputs).

    out_a_THD / out_b_THD [T, Hq, D] (one dtype), lse_a_HT / lse_b_HT [Hq, T] natural-log lse
    (-inf where a row saw no key). Returns (out_THD [T, Hq, D] in the outputs' dtype, lse_HT
    [Hq, T] float32, or float64 when an input is float64).
    """
    if out_a_THD.dim() != 3 or out_a_THD.shape != out_b_THD.shape:
        raise ValueError(
            f"triton_merge_attn_partials: outputs must both be [T, Hq, D], got "
            f"{tuple(out_a_THD.shape)} and {tuple(out_b_THD.shape)}"
        )
    if out_a_THD.dtype != out_b_THD.dtype:
        raise ValueError(
            f"triton_merge_attn_partials: output dtypes differ: {out_a_THD.dtype}, "
            f"{out_b_THD.dtype}"
        )
    T, Hq, _ = out_a_THD.shape
    if lse_a_HT.shape != (Hq, T) or lse_b_HT.shape != (Hq, T):
        raise ValueError(
            f"triton_merge_attn_partials: lse must be [Hq, T] = {(Hq, T)}, got "
            f"{tuple(lse_a_HT.shape)} and {tuple(lse_b_HT.shape)}"
        )
    for x in (out_a_THD, lse_a_HT, lse_b_HT):
        if not x.dtype.is_floating_point:
            raise ValueError(f"triton_merge_attn_partials: expected float tensors, got {x.dtype}")
    return TritonMergeFunction.apply(out_a_THD, lse_a_HT, out_b_THD, lse_b_HT)
