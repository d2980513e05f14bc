"""RMSNorm: the torch reference against its formula and the backend choice (no Triton here;
the Triton kernels are tested in tests/kernels/triton/test_triton_norm.py).

Legend: T tokens, D model dim.
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
    """bfloat16 in, bfloat16 out; the result is the float32 computation rounded once."""
    x = torch.randn(63, 64).to(torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, rms_norm_naive(x.float(), w.float(), 1e-5).to(torch.bfloat16))


def test_auto_on_cpu_is_the_torch_reference():
    x, w = torch.randn(17, 16), torch.randn(16)
    assert torch.equal(rms_norm(x, w, 1e-5, backend="auto"), rms_norm_naive(x, w, 1e-5))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="weight has"):
        rms_norm(torch.randn(4, 16), torch.ones(15))
    with pytest.raises(ValueError, match="unknown norm backend"):
        rms_norm(torch.randn(4, 16), torch.ones(16), backend="cuda")
