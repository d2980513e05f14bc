"""A linear layer that casts its weight inside the op and again in the backward.

Legend (kernels/__init__.py): T tokens (any leading dims), I input width, O output width.

Autocast's `linear` casts the float32 weight to bf16 and saves that copy for the backward
(it needs W for dx): with autocast's cache off, every layer's bf16 weight copy still lives
from its forward to its backward, i.e. a bf16 copy of the whole model at the loss, in the
activations. This op saves the master weight itself (a parameter: no new bytes) and casts
it again in the backward, trading one cast per layer for that copy; it computes what
autocast's linear computes (inputs and weight in `dtype`, output in `dtype`).
"""

import torch


class _CastWeightLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TI, weight_OI, bias_O, dtype):
        x = x_TI.to(dtype)
        y_TO = torch.nn.functional.linear(
            x, weight_OI.to(dtype), None if bias_O is None else bias_O.to(dtype)
        )
        ctx.save_for_backward(x, weight_OI)
        ctx.x_dtype = x_TI.dtype
        ctx.bias_dtype = None if bias_O is None else bias_O.dtype
        return y_TO

    @staticmethod
    def backward(ctx, dy_TO):
        x, weight_OI = ctx.saved_tensors
        dy = dy_TO.to(x.dtype)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight_OI.to(x.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # Leading dims flattened into one T.
            dy_TO, x_TI = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            dweight = (dy_TO.t() @ x_TI).to(weight_OI.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, dweight, dbias, None


def linear_cast_weight(
    x_TI: torch.Tensor,
    weight_OI: torch.Tensor,
    bias_O: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """y = x W^T + b computed in `dtype` ([..., I] -> [..., O], in `dtype`), saving the
    weight as given (no cast copy) and x in `dtype`. Gradients come back in the dtypes of x,
    the weight and the bias (the weight's in float32 for float32 master weights)."""
    with torch.autocast(x_TI.device.type, enabled=False):
        return _CastWeightLinear.apply(x_TI, weight_OI, bias_O, dtype)


__all__ = ["linear_cast_weight"]
