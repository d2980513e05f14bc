"""RMSNorm in Triton, forward and backward.

Legend (kernels/__init__.py): T rows (tokens; all leading dims flattened), E the normalised
width (the model width); added here: BT / BE blocks of rows / of the width.
    y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)            (float32 math)
    dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * w,  xhat = x * rstd
    dw = sum_rows dy * xhat
The forward saves rstd [T] (float32). The backward runs a few persistent programs, each
looping over row blocks and keeping its own dw partial; the partials [programs, E] are summed
in torch.

Chain: kernels -> custom ops `longtrain::triton_rms_norm_fwd` / `_bwd` (fake impls for
torch.compile) -> `RMSNormTritonFunction` -> `rms_norm_triton`.
"""

import torch
import triton
import triton.language as tl

from kernels._triton_utils import check_dtype, check_triton_tensors, is_interpreting

__all__ = ["RMSNormTritonFunction", "rms_norm_triton"]


@triton.jit
def rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    T,
    E,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    t_mask = offs_t < T
    e_mask = offs_e < E
    mask = t_mask[:, None] & e_mask[None, :]
    off = offs_t[:, None] * E + offs_e[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / E + eps)
    w = tl.load(w_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + offs_t, rstd, mask=t_mask)


@triton.jit
def rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    T,
    E,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    w = tl.load(w_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_E], tl.float32)
    for block in range(pid, tl.cdiv(T, BLOCK_T), num_programs):
        offs_t = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = offs_t < T
        mask = t_mask[:, None] & e_mask[None, :]
        off = offs_t[:, None] * E + offs_e[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + offs_t, mask=t_mask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, 1) / E
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * E + offs_e, dw, mask=e_mask)


def _blocks(E: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(E)
    return max(1, min(64, 4096 // block_e)), block_e


@torch.library.custom_op("longtrain::triton_rms_norm_fwd", mutates_args=())
def _fwd_op(
    x_TE: torch.Tensor, weight_E: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_tensors("rms_norm_triton", x_TE, weight_E)
    T, E = x_TE.shape
    x_TE, weight_E = x_TE.contiguous(), weight_E.contiguous()
    y_TE = torch.empty_like(x_TE)
    rstd_T = torch.empty(T, dtype=torch.float32, device=x_TE.device)
    block_t, block_e = _blocks(E)
    if T > 0:
        rms_norm_fwd_kernel[(triton.cdiv(T, block_t),)](
            x_TE, weight_E, y_TE, rstd_T, T, E, eps, BLOCK_T=block_t, BLOCK_E=block_e
        )
    return y_TE, rstd_T


@_fwd_op.register_fake
def _(x_TE, weight_E, eps):
    return torch.empty_like(x_TE), x_TE.new_empty(x_TE.shape[0], dtype=torch.float32)


@torch.library.custom_op("longtrain::triton_rms_norm_bwd", mutates_args=())
def _bwd_op(
    dy_TE: torch.Tensor, x_TE: torch.Tensor, weight_E: torch.Tensor, rstd_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_tensors("rms_norm_triton", dy_TE, x_TE, weight_E, rstd_T)
    T, E = x_TE.shape
    dy_TE, x_TE, weight_E = dy_TE.contiguous(), x_TE.contiguous(), weight_E.contiguous()
    dx_TE = torch.empty_like(x_TE)
    block_t, block_e = _blocks(E)
    n_blocks = triton.cdiv(T, block_t)
    if x_TE.is_cuda and not is_interpreting():
        cap = 4 * torch.cuda.get_device_properties(x_TE.device).multi_processor_count
    else:
        cap = 4
    n_programs = max(1, min(n_blocks, cap))
    dw_partials = torch.empty((n_programs, E), dtype=torch.float32, device=x_TE.device)
    if T > 0:
        rms_norm_bwd_kernel[(n_programs,)](
            dy_TE, x_TE, weight_E, rstd_T, dx_TE, dw_partials, T, E,
            BLOCK_T=block_t, BLOCK_E=block_e,
        )  # fmt: skip
    else:
        dw_partials.zero_()
    return dx_TE, dw_partials.sum(0).to(weight_E.dtype)


@_bwd_op.register_fake
def _(dy_TE, x_TE, weight_E, rstd_T):
    return torch.empty_like(x_TE), torch.empty_like(weight_E)


class RMSNormTritonFunction(torch.autograd.Function):
    """Saves x, weight and rstd [T] (float32)."""

    @staticmethod
    def forward(ctx, x_TE, weight_E, eps):
        y_TE, rstd_T = torch.ops.longtrain.triton_rms_norm_fwd(x_TE, weight_E, eps)
        ctx.save_for_backward(x_TE, weight_E, rstd_T)
        return y_TE

    @staticmethod
    def backward(ctx, dy_TE):
        x_TE, weight_E, rstd_T = ctx.saved_tensors
        dx_TE, dw_E = torch.ops.longtrain.triton_rms_norm_bwd(dy_TE, x_TE, weight_E, rstd_T)
        return dx_TE, dw_E, None


def rms_norm_triton(x_TE: torch.Tensor, weight_E: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm on the Triton kernels: x_TE [..., E] (float16/bfloat16/float32), weight_E [E]
    -> [..., E] in x's dtype. Differentiable in x and weight."""
    E = x_TE.shape[-1]
    if weight_E.shape != (E,):
        raise ValueError(f"rms_norm_triton: weight must be [{E}], got {tuple(weight_E.shape)}")
    check_dtype("rms_norm_triton", x_TE.dtype)
    check_dtype("rms_norm_triton (weight)", weight_E.dtype)
    y_TE = RMSNormTritonFunction.apply(x_TE.reshape(-1, E), weight_E, float(eps))
    return y_TE.view(x_TE.shape)
