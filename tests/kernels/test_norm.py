"""RMSNorm: the torch reference against its formula and the backend choice (no Triton here;
the Triton kernels are tested in tests/kernels/triton/test_triton_norm.py).

Legend (kernels/__init__.py): T tokens, E model width.
"""

import pytest
import torch

from kernels.norm import rms_norm, rms_norm_naive


def test_matches_formula_in_float64():
    x = torch.randn(2, 17, 40, dtype=torch.float64)
    w = torch.randn(40, dtype=torch.float64)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want, rtol=1e-14, atol=1e-14)


def test_low_precision_is_normalised_in_float32():
    """bfloat16 in, bfloat16 out; the result is the float32 computation rounded once, so it is
    the exact formula (float64) up to one rounding to bfloat16."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(63, 64, generator=gen).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(torch.bfloat16)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    x64, w64 = x.double(), w.double()
    want = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5) * w64
    # One rounding to bfloat16 is at most half an ulp, 2^-8 relative; the float32 math before
    # it adds ~1e-7 (2^-20 covers it). Normalising in bfloat16 instead rounds the mean of
    # squares, rstd and two products too: measured 1.1e-2 relative here, well above.
    torch.testing.assert_close(y.double(), want, rtol=2**-8 + 2**-20, atol=0)


def test_auto_on_cpu_is_the_torch_reference():
    x, w = torch.randn(17, 16), torch.randn(16)
    assert torch.equal(rms_norm(x, w, 1e-5, backend="auto"), rms_norm_naive(x, w, 1e-5))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="weight has"):
        rms_norm(torch.randn(4, 16), torch.ones(15))
    with pytest.raises(ValueError, match="unknown norm backend"):
        rms_norm(torch.randn(4, 16), torch.ones(16), backend="cuda")
