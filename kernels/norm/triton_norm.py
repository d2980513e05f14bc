"""RMSNorm in Triton, forward and backward.

Legend: N rows (all leading dims flattened), D model dim, BT / BD blocks, P programs.
    y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)            (float32 math)
    dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * w,  xhat = x * rstd
    dw = sum_rows dy * xhat
The forward saves rstd [N] (float32). The backward runs P persistent programs, each looping
over row blocks and keeping its own dw partial; the P partials [P, D] are summed in torch.

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
    N,
    D,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < N
    d_mask = offs_d < D
    mask = t_mask[:, None] & d_mask[None, :]
    off = offs_t[:, None] * D + offs_d[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
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
    N,
    D,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_T), num_programs):
        offs_t = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = offs_t < N
        mask = t_mask[:, None] & d_mask[None, :]
        off = offs_t[:, None] * D + offs_d[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + offs_t, mask=t_mask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, 1) / D
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * D + offs_d, dw, mask=d_mask)


def _blocks(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, min(64, 4096 // block_d)), block_d


@torch.library.custom_op("longtrain::triton_rms_norm_fwd", mutates_args=())
def _fwd_op(
    x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = x_ND.shape
    x_ND, weight_D = x_ND.contiguous(), weight_D.contiguous()
    y_ND = torch.empty_like(x_ND)
    rstd_N = torch.empty(N, dtype=torch.float32, device=x_ND.device)
    block_t, block_d = _blocks(D)
    if N > 0:
        rms_norm_fwd_kernel[(triton.cdiv(N, block_t),)](
            x_ND, weight_D, y_ND, rstd_N, N, D, eps, BLOCK_T=block_t, BLOCK_D=block_d
        )
    return y_ND, rstd_N


@_fwd_op.register_fake
def _(x_ND, weight_D, eps):
    return torch.empty_like(x_ND), x_ND.new_empty(x_ND.shape[0], dtype=torch.float32)


@torch.library.custom_op("longtrain::triton_rms_norm_bwd", mutates_args=())
def _bwd_op(
    dy_ND: torch.Tensor, x_ND: torch.Tensor, weight_D: torch.Tensor, rstd_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = x_ND.shape
    dy_ND, x_ND, weight_D = dy_ND.contiguous(), x_ND.contiguous(), weight_D.contiguous()
    dx_ND = torch.empty_like(x_ND)
    block_t, block_d = _blocks(D)
    n_blocks = triton.cdiv(N, block_t)
    if x_ND.is_cuda and not is_interpreting():
        cap = 4 * torch.cuda.get_device_properties(x_ND.device).multi_processor_count
    else:
        cap = 4
    P = max(1, min(n_blocks, cap))
    dw_partial_PD = torch.empty((P, D), dtype=torch.float32, device=x_ND.device)
    if N > 0:
        rms_norm_bwd_kernel[(P,)](
            dy_ND, x_ND, weight_D, rstd_N, dx_ND, dw_partial_PD, N, D,
            BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
    else:
        dw_partial_PD.zero_()
    return dx_ND, dw_partial_PD.sum(0).to(weight_D.dtype)


@_bwd_op.register_fake
def _(dy_ND, x_ND, weight_D, rstd_N):
    return torch.empty_like(x_ND), torch.empty_like(weight_D)


class RMSNormTritonFunction(torch.autograd.Function):
    """Saves x, weight and rstd [N] (float32)."""

    @staticmethod
    def forward(ctx, x_ND, weight_D, eps):
        y_ND, rstd_N = torch.ops.longtrain.triton_rms_norm_fwd(x_ND, weight_D, eps)
        ctx.save_for_backward(x_ND, weight_D, rstd_N)
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, weight_D, rstd_N = ctx.saved_tensors
        dx_ND, dw_D = torch.ops.longtrain.triton_rms_norm_bwd(dy_ND, x_ND, weight_D, rstd_N)
        return dx_ND, dw_D, None


def rms_norm_triton(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm on the Triton kernels: x_TD [..., D] (float16/bfloat16/float32), weight_D [D]
    -> [..., D] in x's dtype. Differentiable in x and weight."""
    D = x_TD.shape[-1]
    if weight_D.shape != (D,):
        raise ValueError(f"rms_norm_triton: weight must be [{D}], got {tuple(weight_D.shape)}")
    check_dtype("rms_norm_triton", x_TD.dtype)
    check_dtype("rms_norm_triton (weight)", weight_D.dtype)
    check_triton_tensors("rms_norm_triton", x_TD, weight_D)
    y_ND = RMSNormTritonFunction.apply(x_TD.reshape(-1, D), weight_D, float(eps))
    return y_ND.view(x_TD.shape)
