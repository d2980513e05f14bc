"""Shared pieces of the Triton kernel tests: device, document layouts, the 2x error rule.

Legend (kernels/__init__.py): T tokens, Hq query heads, K key/value heads, D head dim.
"""

import torch

from kernels._triton_utils import is_interpreting

# Under the interpreter kernels take CPU tensors; on a GPU machine they run compiled on CUDA.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu")


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |x - ref| in float64; infinities must sit at the same places and equal."""
    x, ref = x.double().cpu(), ref.double().cpu()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(x), inf), "infinities differ from the reference"
    assert torch.equal(x[inf], ref[inf]), "signs of infinities differ from the reference"
    assert not torch.isnan(x).any(), "NaN in the kernel's result"
    if (~inf).sum() == 0:
        return 0.0
    return (x[~inf] - ref[~inf]).abs().max().item()


# Rounding units of slack at the reference's scale (see assert_2x).
NOISE_UNITS = 4


def assert_2x(name: str, kernel: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor):
    """The flash-attention rule: the kernel's error against the float64 reference is at most
    twice that of a torch implementation run in the kernel's dtype, plus NOISE_UNITS rounding
    units of that dtype at the reference's scale. The slack is there because where both errors
    are the rounding noise of a handful of operations (a single row, a sum over a few terms),
    the ratio of two such maxima is itself noise: measured, a one-row float32 merge gave 2.3e-7
    against torch's 3.8e-8, both a few ulps. A real loss of precision (16-bit accumulation,
    a dropped term) is orders of magnitude above this slack."""
    err = max_err(kernel, ref)
    err_torch = max_err(same_dtype, ref)
    finite = ref[torch.isfinite(ref)]
    # At least 1: test inputs are unit normals, so a result that cancels to ~0 (dq of a query
    # that sees a single key is exactly 0) still carries rounding noise of O(1) terms.
    scale = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    unit = NOISE_UNITS * torch.finfo(kernel.dtype).eps
    bound = 2 * err_torch + unit * scale
    assert err <= bound, (
        f"{name}: error {err:.3g} > 2 x torch's {err_torch:.3g} + {unit * scale:.3g}"
    )
