"""RoPE in Triton, forward and backward (the backward is the inverse rotation).

Legend (kernels/__init__.py): T tokens, H heads (query or key/value), D head dim (even);
added here: D2 = D / 2 rotation pairs (a suffix, as in `inv_freq_D2`), BT / BH / BD2 blocks.
Convention as `naive.py` (Llama's rotate-half): pair (i, i + D2) of token t is rotated by
angle pos_t * inv_freq_i. The angle is formed in float32 from the same inv_freq table the
reference uses (`rope_inv_freq`), cos/sin and the rotation run in float32, and the result is
rounded once to the input dtype (the torch reference rounds cos/sin to 16-bit inputs first).

Chain: `rope_kernel` -> custom op `longtrain::triton_rope` (fake impl for torch.compile) ->
`RopeTritonFunction` -> `rope_triton`.
"""

import torch
import triton
import triton.language as tl

from kernels._triton_utils import check_dtype, check_triton_tensors
from kernels.rope.naive import rope_inv_freq

__all__ = ["RopeTritonFunction", "rope_triton"]


@triton.jit
def rope_kernel(
    x_ptr,
    y_ptr,
    pos_ptr,
    inv_freq_ptr,
    stride_xt,
    stride_xh,
    stride_yt,
    stride_yh,
    T,
    H,
    half,
    INVERSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D2: tl.constexpr,
):
    """y[BT, BH, D] = rotation of x by the angles of BT tokens (INVERSE: the transpose)."""
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d2 = tl.arange(0, BLOCK_D2)
    t_mask = offs_t < T
    d2_mask = offs_d2 < half
    pos = tl.load(pos_ptr + offs_t, mask=t_mask, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + offs_d2, mask=d2_mask, other=0.0)
    angle_TD2 = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle_TD2)[:, None, :]
    sin = tl.sin(angle_TD2)[:, None, :]
    if INVERSE:
        sin = -sin
    mask = t_mask[:, None, None] & (offs_h < H)[None, :, None] & d2_mask[None, None, :]
    x_off = offs_t[:, None, None] * stride_xt + offs_h[None, :, None] * stride_xh
    y_off = offs_t[:, None, None] * stride_yt + offs_h[None, :, None] * stride_yh
    x1 = tl.load(x_ptr + x_off + offs_d2[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half + offs_d2[None, None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + y_off + offs_d2[None, None, :], y1.to(out_ty), mask=mask)
    tl.store(y_ptr + y_off + half + offs_d2[None, None, :], y2.to(out_ty), mask=mask)


def _launch(
    x_THD: torch.Tensor,
    position_ids_T: torch.Tensor,
    inv_freq_D2: torch.Tensor,
    inverse: bool,
    y_THD: torch.Tensor,
) -> None:
    T, H, D = x_THD.shape
    if T == 0 or H == 0 or D == 0:
        return
    block_d2 = triton.next_power_of_2(D // 2)
    block_h = min(triton.next_power_of_2(H), 16)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // (block_d2 * block_h)))
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    rope_kernel[grid](
        x_THD, y_THD, position_ids_T, inv_freq_D2, x_THD.stride(0), x_THD.stride(1),
        y_THD.stride(0), y_THD.stride(1), T, H, D // 2,
        INVERSE=inverse, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D2=block_d2,
    )  # fmt: skip


@torch.library.custom_op("longtrain::triton_rope", mutates_args=())
def _rope_op(
    x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, inverse: bool
) -> torch.Tensor:
    check_triton_tensors("rope_triton", x, position_ids, inv_freq)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty_like(x)
    _launch(x, position_ids.contiguous(), inv_freq.contiguous(), inverse, y)
    return y


@_rope_op.register_fake
def _(x, position_ids, inv_freq, inverse):
    return torch.empty_like(x)


class RopeTritonFunction(torch.autograd.Function):
    """Rotation forward, inverse rotation backward; saves only positions and inv_freq."""

    @staticmethod
    def forward(ctx, x_THD, position_ids_T, inv_freq_D2):
        ctx.save_for_backward(position_ids_T, inv_freq_D2)
        return torch.ops.longtrain.triton_rope(x_THD, position_ids_T, inv_freq_D2, False)

    @staticmethod
    def backward(ctx, dy_THD):
        position_ids_T, inv_freq_D2 = ctx.saved_tensors
        dx_THD = torch.ops.longtrain.triton_rope(dy_THD, position_ids_T, inv_freq_D2, True)
        return dx_THD, None, None


def rope_triton(x_THD: torch.Tensor, position_ids_T: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on the Triton kernel: x_THD [T, H, D] (D even; float16/bfloat16/float32),
    position_ids_T [T] int -> [T, H, D] in x's dtype. Differentiable in x."""
    if x_THD.dim() != 3 or x_THD.shape[-1] % 2:
        raise ValueError(f"rope_triton expects [T, H, D] with even D, got {tuple(x_THD.shape)}")
    if position_ids_T.shape != x_THD.shape[:1] or position_ids_T.dtype.is_floating_point:
        raise ValueError(
            f"rope_triton: position_ids must be int [{x_THD.shape[0]}], got "
            f"{position_ids_T.dtype} {tuple(position_ids_T.shape)}"
        )
    check_dtype("rope_triton", x_THD.dtype)
    inv_freq_D2 = rope_inv_freq(x_THD.shape[-1], theta, x_THD.device)
    return RopeTritonFunction.apply(x_THD, position_ids_T, inv_freq_D2)
