"""linear_cast_weight: what autocast's linear computes, without saving a cast weight copy.

Legend (kernels/__init__.py): T tokens, I input width, O output width.
"""

import pytest
import torch

from kernels.linear import linear_cast_weight


def _inputs(seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 24, generator=gen).to(torch.bfloat16).requires_grad_()
    w = torch.randn(16, 24, generator=gen).requires_grad_()  # float32 master weight
    b = torch.randn(16, generator=gen).requires_grad_() if bias else None
    dy = torch.randn(2, 9, 16, generator=gen).to(torch.bfloat16)
    return x, w, b, dy


@pytest.mark.parametrize("bias", [False, True])
def test_follows_the_float64_formula_on_bf16_rounded_operands(bias):
    x, w, b, dy = _inputs(0, bias)
    inputs = [t for t in (x, w, b) if t is not None]
    y = linear_cast_weight(x, w, b, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, inputs, dy)
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]
    # The reference: float64 on the bf16-rounded operands (what the op multiplies), written
    # out here, not through the op.
    x64, w64 = x.detach().double(), w.detach().bfloat16().double()
    y64 = x64 @ w64.t() + (b.detach().bfloat16().double() if bias else 0)
    dy64 = dy.double()
    want = [dy64 @ w64, (dy64.reshape(-1, 16).t() @ x64.reshape(-1, 24))]
    if bias:
        want.append(dy64.reshape(-1, 16).sum(0))
    # Each result is a float32-accumulated sum of 24 (or 18) exact products rounded once to
    # bfloat16: half an ulp, 2^-8 relative to the result, plus float32 accumulation ~1e-6 of
    # the operands' magnitude (atol for sums that cancel towards 0).
    torch.testing.assert_close(y.double(), y64, rtol=2**-8, atol=1e-2)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=2**-8, atol=1e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_equals_autocast_linear_bit_for_bit(bias):
    """The same bf16 matmuls autocast's linear runs, so the same bits on this CPU."""
    x, w, b, dy = _inputs(1, bias)
    inputs = [t for t in (x, w, b) if t is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        ours = linear_cast_weight(x, w, b, torch.bfloat16)
        theirs = torch.nn.functional.linear(x, w, b)
    assert torch.equal(ours, theirs)
    for a, c in zip(torch.autograd.grad(ours, inputs, dy), torch.autograd.grad(theirs, inputs, dy)):
        assert torch.equal(a, c)


def test_saves_the_master_weight_not_a_cast_copy():
    """What the backward keeps: x in bf16 and the float32 parameter itself (autocast's linear
    keeps a new bf16 copy of the weight: a copy of the model until the backward)."""
    x, w, _, _ = _inputs(2, False)
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        linear_cast_weight(x, w, None, torch.bfloat16)
    assert any(t is w for t in saved)
    assert [t.dtype for t in saved if t is not w] == [torch.bfloat16]

    saved.clear()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
        torch.nn.functional.linear(x, w)
    # The check above can fail: autocast's linear saves a bf16 copy (a view: W^T) instead.
    assert not any(t is w for t in saved)
    assert any(t.numel() == w.numel() and t.dtype == torch.bfloat16 for t in saved)
