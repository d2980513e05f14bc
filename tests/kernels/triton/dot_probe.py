"""A one-block Triton kernel around `kernels.triton_dot.mma`, for the interpreter's bf16 probe.

Kernels must be defined in files (the interpreter reads their source), hence this module.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_dot import mma


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, PRECISION: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs[:, None] * N + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * N + offs[None, :])
    tl.store(c_ptr + offs[:, None] * N + offs[None, :], mma(a, b, PRECISION))


def dot_with_precision(a_NN: torch.Tensor, b_NN: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b of two square [N, N] blocks (N a power of two >= 16) by `mma`, float32 result."""
    n = a_NN.shape[0]
    c_NN = torch.empty(n, n, dtype=torch.float32, device=a_NN.device)
    _dot_kernel[(1,)](a_NN.contiguous(), b_NN.contiguous(), c_NN, N=n, PRECISION=precision)
    return c_NN
