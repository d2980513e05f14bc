"""`mma`: the `tl.dot` of our Triton kernels, with one interpreter-only workaround.

Triton's CPU interpreter (TRITON_INTERPRET=1) computes `tl.dot` of bfloat16 blocks wrongly
(measured: attention outputs off by ~1e9, where float16 and float32 are right). Under the
interpreter `dot_precision(torch.bfloat16)` is UPCAST_BF16_DOT, and `mma` then widens both
bfloat16 operands to float32 before an exact float32 dot. That is the GPU's bfloat16 dot in
value, not just close to it: a product of two bfloat16 numbers (8-bit significands) is exact
in float32 (24 bits), and the tensor cores accumulate bfloat16 products in float32 too. So
the bfloat16 tests under the interpreter check everything the kernels do with bfloat16
(loads, the casts of p and dS to bfloat16 before their dots, stores) except the tensor-core
instruction itself, which only a GPU runs. Compiled for a GPU, PRECISION is never
UPCAST_BF16_DOT and the branch is compiled away.
"""

import triton
import triton.language as tl

from kernels._triton_utils import UPCAST_BF16_DOT

_UPCAST = tl.constexpr(UPCAST_BF16_DOT)  # jit functions read only constexpr globals


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] accumulated in float32; PRECISION from `dot_precision`."""
    if PRECISION == _UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c
