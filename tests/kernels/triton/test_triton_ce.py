"""Triton fused linear + cross-entropy against materialised logits and F.cross_entropy.

Legend (kernels/__init__.py): T tokens, E model width, V vocabulary. Reference: float64
logits [T, V] materialised, `F.cross_entropy(reduction="none")` times the token weights,
summed; gradients by autograd for hidden, weight and the token weights. In float64 the fused
path computes the same sums in another order, so it agrees to float64 rounding. In float32 /
float16 the 2x rule holds against the project's torch path
(`linear_cross_entropy(backend="torch")`, float32 math) in the same dtype. V = 1500 is more
than one vocab block (1024) and not a multiple of it; tile_tokens = 16 cuts T into several
tiles and a partial one.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.loss import linear_cross_entropy
from kernels.loss.triton_ce import triton_linear_cross_entropy
from tests.kernels.triton.helpers import DEVICE, assert_2x

IGNORE = -100


def _inputs(T: int, E: int, V: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, E, generator=gen, dtype=torch.float64)
    weight = 0.3 * torch.randn(V, E, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[::5] = IGNORE
    token_weights = torch.rand(T, generator=gen, dtype=torch.float64)
    return hidden, weight, labels, token_weights


def _materialised(hidden, weight, labels, token_weights, ignore_index=IGNORE, tile_tokens=0):
    ce_T = F.cross_entropy(hidden @ weight.t(), labels, reduction="none", ignore_index=ignore_index)
    return (ce_T * token_weights).sum()


def _fused(hidden, weight, labels, token_weights, ignore_index=IGNORE, tile_tokens=16):
    return triton_linear_cross_entropy(
        hidden, weight, labels, token_weights, ignore_index, tile_tokens
    )


def _torch_tiled(hidden, weight, labels, token_weights, ignore_index=IGNORE, tile_tokens=16):
    return linear_cross_entropy(
        hidden, weight, labels, token_weights, ignore_index, tile_tokens, backend="torch"
    )


def _run(fn, inputs, dtype, device="cpu", **kw):
    hidden, weight, labels, token_weights = inputs
    weights_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = [
        hidden.to(device, dtype).requires_grad_(),
        weight.to(device, dtype).requires_grad_(),
        labels.to(device),
        token_weights.to(device, weights_dtype).requires_grad_(),
    ]
    loss = fn(*args, **kw)
    grads = torch.autograd.grad(loss, (args[0], args[1], args[3]))
    return (loss.detach(), *grads)


NAMES = ("loss", "dhidden", "dweight", "dtoken_weights")


def test_float64_equals_materialised():
    """Same sums in another order: float64 rounding only (a few ulps of O(10^2) values)."""
    inputs = _inputs(17, 40, 1500)
    ref = _run(_materialised, inputs, torch.float64)
    got = _run(_fused, inputs, torch.float64, DEVICE)
    for name, g, r in zip(NAMES, got, ref):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-12, atol=1e-12, msg=name)


def _check(T, E, V, dtype):
    inputs = _inputs(T, E, V)
    ref = _run(_materialised, inputs, torch.float64)
    same_dtype = _run(_torch_tiled, inputs, dtype)
    got = _run(_fused, inputs, dtype, DEVICE)
    for name, g, s, r in zip(NAMES, got, same_dtype, ref):
        assert g.shape == r.shape and g.dtype == s.dtype, name
        assert_2x(name, g, s, r)


FAST = [(17, 40, 1500, torch.float32), (17, 64, 1500, torch.float16)]
SLOW = [
    c
    for c in itertools.product(
        [1, 17, 63, 130], [16, 40, 64], [1500], [torch.float32, torch.float16]
    )
    if c not in FAST
]


def _id(T, E, V, dtype):
    return f"T{T}-E{E}-V{V}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", FAST, ids=[_id(*c) for c in FAST])
def test_matches_reference(case):
    _check(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[_id(*c) for c in SLOW])
def test_matches_reference_sweep(case):
    _check(*case)


def test_other_ignore_index_and_no_weights():
    """ignore_index 0 (a real class id) and token_weights None (all ones)."""
    hidden, weight, labels, _ = _inputs(17, 16, 300)
    labels[labels == IGNORE] = 0
    h64, w64 = hidden.requires_grad_(), weight.requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), labels, reduction="sum", ignore_index=0)
    ref_grads = torch.autograd.grad(ref, (h64, w64))
    h, w = (x.detach().to(DEVICE).requires_grad_() for x in (hidden, weight))
    loss = triton_linear_cross_entropy(h, w, labels.to(DEVICE), None, ignore_index=0, tile_tokens=5)
    grads = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(loss.cpu(), ref.detach(), rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu(), r, rtol=1e-12, atol=1e-12)


def test_dispatch_through_linear_cross_entropy():
    """`linear_cross_entropy(backend="triton")` reaches this kernel: the very same number."""
    hidden, weight, labels, token_weights = (x.to(DEVICE) for x in _inputs(17, 16, 300))
    hidden, weight, token_weights = hidden.float(), weight.float(), token_weights.float()
    a = linear_cross_entropy(hidden, weight, labels, token_weights, IGNORE, 8, backend="triton")
    b = triton_linear_cross_entropy(hidden, weight, labels, token_weights, IGNORE, 8)
    assert torch.equal(a, b)


def test_bad_input_raises():
    h, w = torch.randn(5, 16, device=DEVICE), torch.randn(30, 16, device=DEVICE)
    labels = torch.zeros(5, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="share a float dtype"):
        triton_linear_cross_entropy(h, w.double(), labels)
    with pytest.raises(ValueError, match="labels"):
        triton_linear_cross_entropy(h, w, labels[:4])
    with pytest.raises(ValueError, match="tile_tokens"):
        triton_linear_cross_entropy(h, w, labels, tile_tokens=0)
