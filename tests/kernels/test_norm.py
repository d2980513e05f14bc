"""RMSNorm: the torch reference against its formula and the backend choice (no Triton here;
the Triton kernels are tested in tests/kernels/triton/test_triton_norm.py).

Legend (kernels/__init__.py): T tokens, E model width.
"""

import pytest
import torch

from kernels.norm import rms_norm, rms_norm_naive, rms_norm_torch


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


def test_auto_on_cpu_is_the_torch_backend_and_equals_the_reference():
    x, w = torch.randn(17, 16), torch.randn(16)
    y = rms_norm(x, w, 1e-5, backend="auto")
    assert torch.equal(y, rms_norm_torch(x, w, 1e-5))
    # The same float32 ops in another order: a few ulps of float32.
    torch.testing.assert_close(y, rms_norm_naive(x, w, 1e-5), rtol=1e-6, atol=1e-6)


def test_backward_matches_the_formula_in_float64():
    """The hand-written backward against autograd through the plain float64 formula."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, generator=gen, requires_grad=True)
    dy = torch.randn(3, 11, 24, dtype=torch.float64, generator=gen)
    dx, dw = torch.autograd.grad(rms_norm(x, w, 1e-6, backend="torch"), (x, w), dy)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    dx_ref, dw_ref = torch.autograd.grad(want, (x, w), dy)
    # float64 throughout; two orders of the same sums: ~1e-15 relative.
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)


def test_backward_keeps_the_16_bit_input_and_a_float32_statistic():
    """What a bf16 norm saves for its backward: x in bf16 and rstd [T, 1] in float32 (the
    readable formula under autograd kept two float32 [T, E] copies: 4x the bytes of x)."""
    x = torch.randn(32, 64).to(torch.bfloat16).requires_grad_()
    w = torch.ones(64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_norm(x, w, 1e-5, backend="torch")
    kept = {(str(t.dtype), tuple(t.shape)) for t in saved if t.dim() == 2}
    assert kept == {("torch.bfloat16", (32, 64)), ("torch.float32", (32, 1))}
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_bad_input_raises():
    with pytest.raises(ValueError, match="weight has"):
        rms_norm(torch.randn(4, 16), torch.ones(15))
    with pytest.raises(ValueError, match="unknown norm backend"):
        rms_norm(torch.randn(4, 16), torch.ones(16), backend="cuda")
