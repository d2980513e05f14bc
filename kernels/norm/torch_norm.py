"""RMSNorm on torch ops with a hand-written backward: what the `torch` backend runs.

Legend (kernels/__init__.py): T tokens (any leading dims), E the normalised width.

Autograd through the readable formula (`naive.py`) keeps float32 [T, E] copies of a 16-bit
input for its backward (the upcast input and the normalised product): four times the bytes of
a bf16 input, per norm. This Function keeps what the Triton kernel keeps: the input in its
own dtype and the float32 (float64) reciprocal RMS, [T]; the backward recomputes the rest.
"""

import torch

from kernels.precision import acc_dtype


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TE: torch.Tensor, weight_E: torch.Tensor, eps: float) -> torch.Tensor:
        compute = acc_dtype(x_TE.dtype, weight_E.dtype)
        x = x_TE.to(compute)
        rstd_T1 = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        y_TE = (x * rstd_T1 * weight_E.to(compute)).to(x_TE.dtype)
        ctx.save_for_backward(x_TE, weight_E, rstd_T1)
        return y_TE

    @staticmethod
    def backward(ctx, dy_TE: torch.Tensor):
        x_TE, weight_E, rstd_T1 = ctx.saved_tensors
        compute = rstd_T1.dtype
        xhat = x_TE.to(compute) * rstd_T1
        dxhat = dy_TE.to(compute) * weight_E.to(compute)
        # d/dx of x * rstd: rstd * (dxhat - xhat * mean(dxhat * xhat)) over the last dim.
        dx = rstd_T1 * (dxhat - xhat * (dxhat * xhat).mean(dim=-1, keepdim=True))
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (dy_TE.to(compute) * xhat).reshape(-1, x_TE.shape[-1]).sum(0)
            dweight = dweight.to(weight_E.dtype)
        return dx.to(x_TE.dtype), dweight, None


def rms_norm_torch(x_TE: torch.Tensor, weight_E: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim of `x_TE` ([..., E]), in
    float32 (float64 for float64 inputs), returned in x's dtype; saves x and rstd [..., 1]."""
    return _RMSNormFunction.apply(x_TE, weight_E, eps)


__all__ = ["rms_norm_torch"]
