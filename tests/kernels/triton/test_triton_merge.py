"""Triton LSE merge of two attention partials against the torch `merge_attn_partials`.

Legend (kernels/__init__.py): T query tokens, Hq query heads (H in names), D head dim.
Reference: the torch merge on float64 inputs (it computes in float64 then). Same-dtype
comparator: the torch merge on the same low-precision inputs. The merge has no `tl.dot`, so
bfloat16 is right in the interpreter too.
"""

import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

from kernels.attention.merge import merge_attn_partials
from kernels.attention.triton_merge import triton_merge_attn_partials
from tests.kernels.triton.helpers import DEVICE, assert_2x


def _partials(T: int, H: int, D: int, seed: int = 0):
    """Two partials with rows that saw no key: side a only, side b only, and both sides."""
    gen = torch.Generator().manual_seed(seed)
    out_a, out_b = (torch.randn(T, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    lse_a, lse_b = (3 * torch.randn(H, T, generator=gen, dtype=torch.float64) for _ in range(2))
    lse_a[0, ::3] = -math.inf
    lse_b[0, 1::3] = -math.inf
    lse_a[-1, ::2] = lse_b[-1, ::2] = -math.inf
    # A side that saw no key has out 0 (the attention contract).
    out_a.masked_fill_(torch.isinf(lse_a).t()[..., None], 0)
    out_b.masked_fill_(torch.isinf(lse_b).t()[..., None], 0)
    dout = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    dlse = torch.randn(H, T, generator=gen, dtype=torch.float64)
    return (out_a, lse_a, out_b, lse_b), dout, dlse


def _run(fn, inputs, dout, dlse):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out, lse = fn(*inputs)
    finite = torch.isfinite(lse)
    loss = (out * dout.to(out)).sum() + torch.where(finite, lse * dlse.to(lse), 0).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, inputs))


def _check(T, H, D, dtype):
    inputs, dout, dlse = _partials(T, H, D)
    ref = _run(merge_attn_partials, inputs, dout, dlse)
    low = [inputs[0].to(dtype), inputs[1].float(), inputs[2].to(dtype), inputs[3].float()]
    same_dtype = _run(merge_attn_partials, low, dout, dlse)
    got = _run(triton_merge_attn_partials, [x.to(DEVICE) for x in low], dout.to(DEVICE), dlse)
    names = ("out", "lse", "dout_a", "dlse_a", "dout_b", "dlse_b")
    for name, g, s, r in zip(names, got, same_dtype, ref):
        assert g.dtype == s.dtype and g.shape == r.shape, name
        assert_2x(name, g, s, r)
    both_empty = torch.isinf(inputs[1]) & torch.isinf(inputs[3])
    assert torch.equal(got[0].cpu()[both_empty.t()], torch.zeros_like(got[0].cpu()[both_empty.t()]))
    assert (got[1].cpu()[both_empty] == -math.inf).all()


FAST = [(63, 4, 40, torch.float32), (17, 3, 64, torch.float16)]
SLOW = [
    c
    for c in itertools.product(
        [1, 17, 63, 130], [4], [16, 40, 64], [torch.float32, torch.float16, torch.bfloat16]
    )
    if c not in FAST
]


def _id(T, H, D, dtype):
    return f"T{T}-H{H}-D{D}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", FAST, ids=[_id(*c) for c in FAST])
def test_matches_torch_merge(case):
    _check(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[_id(*c) for c in SLOW])
def test_matches_torch_merge_sweep(case):
    _check(*case)


def test_float64_matches_torch_merge():
    """In float64 both compute the same formula: agreement to a few float64 ulps."""
    inputs, dout, dlse = _partials(17, 2, 16)
    ref = _run(merge_attn_partials, inputs, dout, dlse)
    got = _run(triton_merge_attn_partials, [x.to(DEVICE) for x in inputs], dout.to(DEVICE), dlse)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-12, atol=1e-12)


def test_bad_shapes_raise():
    out = torch.zeros(5, 2, 16, device=DEVICE)
    lse = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="lse must be"):
        triton_merge_attn_partials(out, lse.t(), out, lse)
    with pytest.raises(ValueError, match="outputs"):
        triton_merge_attn_partials(out, lse, out[:4], lse)
