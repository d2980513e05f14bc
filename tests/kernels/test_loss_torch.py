"""The tiled linear + cross-entropy (torch backend) against materialised logits.

Legend (kernels/__init__.py): T tokens, E model width, V vocabulary size.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.loss import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see tests/conftest.py

# (T, E, V, tile_tokens): T not a multiple of the tile, one tile, exact multiple, one token.
CASES = [(37, 8, 11, 8), (5, 16, 130, 4096), (64, 24, 33, 16), (1, 3, 2, 1)]


def _case_id(case):
    T, E, V, tile = case
    return f"T{T}-E{E}-V{V}-tile{tile}"


def _inputs(case, dtype=torch.float64, seed=0):
    T, E, V, _ = case
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, E, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, E, generator=gen, dtype=torch.float64) / E**0.5
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[1::4] = -100  # every fourth token ignored
    weights = torch.rand(T, generator=gen, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), labels, weights


def _reference(hidden, weight, labels, weights, ignore_index=-100):
    """Materialised [T, V] logits and F.cross_entropy, in float64."""
    logits = hidden.double() @ weight.double().t()
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return (ce * weights.double()).sum()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp64_matches_materialised_logits(case):
    hidden, weight, labels, weights = (x.clone() for x in _inputs(case))
    leaves = [hidden.requires_grad_(), weight.requires_grad_(), weights.requires_grad_()]
    loss = linear_cross_entropy(hidden, weight, labels, weights, tile_tokens=case[3])
    grads = torch.autograd.grad(2.5 * loss, leaves)  # a non-unit upstream gradient
    ref = _reference(hidden, weight, labels, weights)
    ref_grads = torch.autograd.grad(2.5 * ref, leaves)
    assert loss.dtype == torch.float64
    # float64 both sides; they differ in summation order only (~1e-16 per term).
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    ignored = labels == -100
    # Ignored tokens: their gradient rows are exactly zero (nothing is added to them).
    assert torch.equal(grads[0][ignored], torch.zeros_like(grads[0][ignored]))
    assert torch.equal(grads[2][ignored], torch.zeros_like(grads[2][ignored]))


def test_no_weights_custom_ignore_index_and_all_ignored():
    hidden, weight, labels, _ = _inputs(CASES[0])
    labels = torch.where(labels == -100, 7, labels)
    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=7, tile_tokens=5)
    ref = _reference(hidden, weight, labels, torch.ones(37), ignore_index=7)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)  # float64, summation order
    h = hidden.clone().requires_grad_()
    none = linear_cross_entropy(h, weight, torch.full((37,), -100), tile_tokens=5)
    (grad,) = torch.autograd.grad(none, h)
    assert none.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_bf16_inputs_compute_in_fp32():
    case = (53, 32, 301, 16)
    hidden, weight, labels, weights = _inputs(case, dtype=torch.bfloat16)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss = linear_cross_entropy(*leaves, labels, weights.float(), tile_tokens=16)
    loss.backward()
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    ref = _reference(*leaves64, labels, weights.float())
    ref.backward()
    assert loss.dtype == torch.float32
    assert leaves[0].grad.dtype == leaves[1].grad.dtype == torch.bfloat16
    # The bf16 values are exact in fp32, so the loss carries only fp32 rounding of the
    # matmuls and sums (~1e-7 relative per op over E=32, V=301 terms).
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    for got, want in zip((x.grad for x in leaves), (x.grad for x in leaves64)):
        # One rounding to bf16 (2^-8 relative); atol covers fp32 noise on near-zero entries.
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5)


def test_mixed_dtypes_and_no_grad():
    hidden, weight, labels, weights = _inputs(CASES[0], dtype=torch.float32)
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, weights.float(), tile_tokens=8)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    with torch.no_grad():
        again = linear_cross_entropy(h, w, labels, weights.float(), tile_tokens=8)
    assert not again.requires_grad
    assert torch.equal(again, loss.detach())  # the same tiles and ops: bit for bit


def test_gradcheck_T7_D3_V5():
    hidden, weight, labels, weights = _inputs((7, 3, 5, 3), seed=1)
    leaves = [x.requires_grad_() for x in (hidden, weight, weights)]
    assert torch.autograd.gradcheck(
        lambda h, w, tw: linear_cross_entropy(h, w, labels, tw, tile_tokens=3), leaves
    )


def test_compile_fullgraph_aot_eager():
    hidden, weight, labels, weights = _inputs(CASES[0])
    h = hidden.clone().requires_grad_()

    def f(h):
        return linear_cross_entropy(h * 2, weight, labels, weights, tile_tokens=8)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(h)
    (grad,) = torch.autograd.grad(compiled, h)
    eager = f(h)
    (grad_eager,) = torch.autograd.grad(eager, h)
    assert torch.equal(compiled, eager) and torch.equal(grad, grad_eager)  # same ops, same order


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden=torch.zeros(37, 9, dtype=torch.float64)), r"\(37, 9\) and \(11, 8\)"),
        (dict(labels=torch.zeros(36, dtype=torch.int64)), "integer \\[37\\]"),
        (dict(labels=torch.zeros(37)), "integer"),
        (dict(token_weights=torch.ones(36)), "token_weights must be float \\[37\\]"),
        (dict(labels=torch.full((37,), 11)), "label 11 at token 0 is outside \\[0, 11\\)"),
        (dict(tile_tokens=0), "tile_tokens must be >= 1, got 0"),
        (dict(backend="cuda"), "'cuda'"),
    ],
    ids=[
        "hidden-dim",
        "labels-len",
        "labels-float",
        "weights-len",
        "label-range",
        "tile",
        "backend",
    ],
)
def test_bad_input_raises(change, message):
    hidden, weight, labels, weights = _inputs(CASES[0])
    args = dict(hidden=hidden, weight=weight, labels=labels, token_weights=weights)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(
            args["hidden"],
            args["weight"],
            args["labels"],
            args["token_weights"],
            tile_tokens=args.get("tile_tokens", 8),
            backend=args.get("backend", "auto"),
        )
