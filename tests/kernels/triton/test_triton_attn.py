"""Triton varlen flash attention (forward, backward, lse gradient) against the float64 reference.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), Hq query heads, K key/value
heads, D head dim. The kernels run through the public path, `attn_varlen(backend="triton")`
(the one autograd chain of every backend); the launchers and `triton_attn_fwd` / `_bwd` are
called directly only where a test needs them (block sizes, exact zeros, argument errors).
Runs under TRITON_INTERPRET=1 on CPU (see conftest.py). The interpreter computes bfloat16
`tl.dot` wrongly (`test_interpreter_bf16_dot_is_still_wrong` keeps measuring it), so there the
bfloat16 cases run the kernels' upcasting dot (`kernels.triton_dot.mma`: both bfloat16 operands
widened to float32, which gives the GPU's bfloat16 dot exactly in value); everything else the
kernels do in bfloat16 (loads, the casts of p and dS, stores) is what a GPU runs. On a GPU the
same cases run the compiled bfloat16 dot. A fast subset runs in `make test`; the sweep over T in
{1, 17, 63, 130}, D in {16, 40, 64}, GQA 1/2/4, both masks and three dtypes is marked slow.

The error rule (helpers.assert_2x): the Triton error against float64 `attn_naive` + autograd
is at most 2x that of the project's torch backend (`attn_varlen(backend="torch")`) run in the
same dtype. That backend implements the same contract: its backward starts from the rounded
(out, lse) of the forward. Naive autograd in float32 never rounds them, and the backward is
sensitive to that rounding: on T63-ragged in float32 even a correctly rounded (out, lse) gives
dk error 2.1e-6 against naive autograd's 5.9e-7 (measured), so 2x of naive float32 autograd
is a bound no out/lse-based backward can meet. In float16 the torch backend accumulates in
float32 on CPU, which makes it the stricter of the two comparators there.
"""

import itertools
import math

import pytest
import torch

pytest.importorskip("triton")

from kernels.attention import attn_naive, attn_varlen
from kernels.attention.triton_attn import _launch_bwd, _launch_fwd, triton_attn_bwd, triton_attn_fwd
from tests.helpers import cu_seqlens
from tests.kernels.triton.helpers import DEVICE, assert_2x

# Document layouts (query lengths, key lengths), named by their total T. Odd sizes on purpose:
# documents of length 1, several blocks of 16 per document, blocks straddling two documents.
LAYOUTS = {
    "T1": ([1], [1]),
    "T17": ([17], [17]),
    "T63": ([5, 1, 57], [5, 1, 57]),
    "T130": ([17, 63, 1, 49], [17, 63, 1, 49]),
    # Lq < Lk (bottom-right causal), Lq > Lk (fully masked rows), Lk = 0 and Lq = 0 documents.
    "T63-ragged": ([3, 20, 30, 7, 0, 3], [10, 20, 70, 2, 5, 0]),
}


def _inputs(layout: str, H: int, K: int, D: int, seed: int = 0):
    lq, lk = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lq), sum(lk)
    q = torch.randn(Tq, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(Tk, K, D, generator=gen, dtype=torch.float64)
    v = torch.randn(Tk, K, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(Tq, H, D, generator=gen, dtype=torch.float64)
    meta = (cu_seqlens(lq), cu_seqlens(lk), max(lq), max(lk))
    return (q, k, v, dout), meta


def _naive(q, k, v, dout, meta, causal, dlse=None):
    """out, lse and the gradients of <out, dout> + <lse, dlse> (finite lse only) by autograd."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = attn_naive(q, k, v, meta[0], meta[1], causal)
    loss = (out * dout).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse * dlse, 0).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def _torch_backend(q, k, v, dout, meta, causal, dlse=None):
    """The same, through `attn_varlen(backend="torch")` on CPU."""
    return _public(q, k, v, dout, meta, causal, dlse, "torch", "cpu")


def _triton(q, k, v, dout, meta, causal, dlse=None):
    """The same, through `attn_varlen(backend="triton")` (its backward takes dlse natively)."""
    return _public(q, k, v, dout, meta, causal, dlse, "triton", DEVICE)


def _public(q, k, v, dout, meta, causal, dlse, backend, device):
    """out, lse and the gradients of <out, dout> + <lse, dlse> through `attn_varlen`."""
    q, k, v = (x.detach().to(device).requires_grad_() for x in (q, k, v))
    cu_q, cu_k, max_q, max_k = meta
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    out, lse = attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, backend=backend)
    loss = (out * dout.to(device, out.dtype)).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse * dlse.to(device), 0).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def _check_against_reference(layout, H, K, D, causal, dtype, with_dlse=False):
    (q, k, v, dout), meta = _inputs(layout, H, K, D)
    dlse = torch.randn(H, q.shape[0], dtype=torch.float64) if with_dlse else None
    ref = _naive(q, k, v, dout, meta, causal, dlse)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    same_dtype = _torch_backend(*low, meta, causal, dlse)
    got = _triton(*low, meta, causal, dlse)
    for name, g, s, r in zip(("out", "lse", "dq", "dk", "dv"), got, same_dtype, ref):
        assert g.shape == r.shape and g.dtype == (torch.float32 if name == "lse" else dtype)
        assert_2x(name, g, s, r)


def _id(layout, H, K, D, causal, dtype):
    return f"{layout}-H{H}-K{K}-D{D}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"


FAST = [
    ("T130", 4, 2, 40, True, torch.float32),
    ("T130", 4, 2, 40, False, torch.float32),
    ("T63-ragged", 4, 1, 16, True, torch.float32),
    ("T63", 2, 2, 64, True, torch.float16),
    ("T130", 4, 2, 40, True, torch.bfloat16),
    ("T63-ragged", 4, 1, 16, False, torch.bfloat16),
]
SLOW = [
    (layout, H, K, D, causal, dtype)
    for layout, (H, K), D, causal, dtype in itertools.product(
        LAYOUTS,
        [(4, 4), (4, 2), (4, 1)],
        [16, 40, 64],
        [True, False],
        [torch.float32, torch.float16, torch.bfloat16],
    )  # fmt: skip
    if (layout, H, K, D, causal, dtype) not in FAST
]


@pytest.mark.parametrize("case", FAST, ids=[_id(*c) for c in FAST])
def test_matches_reference(case):
    _check_against_reference(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[_id(*c) for c in SLOW])
def test_matches_reference_sweep(case):
    _check_against_reference(*case)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_gradient(causal):
    """Ring attention merges partials by lse under autograd: dlse must reach q and k."""
    _check_against_reference("T63-ragged", 4, 2, 40, causal, torch.float32, with_dlse=True)


def test_lse_gradient_bf16():
    """The same in bfloat16, the dtype ring attention runs in on GPUs."""
    _check_against_reference("T63-ragged", 4, 2, 40, True, torch.bfloat16, with_dlse=True)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a fact about Triton's CPU interpreter")
def test_interpreter_bf16_dot_is_still_wrong():
    """Why the bfloat16 cases upcast under the interpreter: its plain bfloat16 `tl.dot` is
    wrong (triton 3.7.1). When this fails, the interpreter got it right: drop UPCAST_BF16_DOT
    (kernels/_triton_utils.py) and test the plain bfloat16 dot."""
    from tests.kernels.triton.dot_probe import dot_with_precision

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    exact = a16.double() @ b16.double()
    upcast = dot_with_precision(a16, b16, "upcast_bf16").double()
    plain = dot_with_precision(a16, b16, "tf32").double()
    # Products of bfloat16 numbers are exact in float32; 16 of them summed in float32 round
    # at ~1e-7 relative of sums of O(4) terms.
    torch.testing.assert_close(upcast, exact, rtol=0, atol=1e-5)
    assert (plain - exact).abs().max() > 1.0, "the interpreter's bfloat16 dot is now right"


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16)], ids=["BM16-BN32", "BM32-BN16"])
def test_unequal_blocks_write_every_row(block_m, block_n):
    """Launchers on NaN-filled outputs, with query and key blocks of different sizes (the
    causal block bounds differ then): every in-document value is written and right."""
    (q, k, v, dout), meta = _inputs("T63-ragged", 4, 2, 40)
    cu_q, cu_k, max_q, max_k = meta
    scale = 1 / math.sqrt(40)
    ref = _naive(q, k, v, dout, meta, True)
    q32, k32, v32, dout32 = (x.float().to(DEVICE) for x in (q, k, v, dout))
    cu_q, cu_k = cu_q.to(DEVICE), cu_k.to(DEVICE)
    out = torch.full_like(q32, math.nan)
    lse = torch.full((4, q.shape[0]), math.nan, device=DEVICE)
    blocks = dict(block_m=block_m, block_n=block_n)
    _launch_fwd(q32, k32, v32, cu_q, cu_k, max_q, True, scale, out, lse, **blocks)
    dq, dk, dv = (torch.full_like(x, math.nan) for x in (q32, k32, v32))
    _launch_bwd(
        dout32, q32, k32, v32, out, lse, cu_q, cu_k, max_q, max_k, True, scale, dq, dk, dv,
        **blocks,
    )  # fmt: skip
    # float32 against float64 over at most 70 keys: a few ulps of O(1) values.
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
        assert not torch.isnan(got).any(), f"{name}: a value was never written"
        torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=2e-5, msg=name)


def test_fully_masked_rows_and_empty_documents():
    """Rows that see no key: out exactly 0, lse exactly -inf, and exactly zero gradients."""
    lq, lk = [4, 3, 2], [1, 0, 5]  # doc 0: 3 of 4 queries see nothing; doc 1: no keys at all
    H, K, D = 2, 1, 16
    q = torch.randn(sum(lq), H, D, device=DEVICE)
    k = torch.randn(sum(lk), K, D, device=DEVICE)
    v = torch.randn(sum(lk), K, D, device=DEVICE)
    cu_q, cu_k = cu_seqlens(lq, device=DEVICE), cu_seqlens(lk, device=DEVICE)
    out, lse = triton_attn_fwd(q, k, v, cu_q, cu_k, 4, 5, causal=True)
    masked = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool, device=DEVICE)
    assert torch.equal(out[masked], torch.zeros_like(out[masked]))
    assert torch.equal(lse[:, masked], torch.full_like(lse[:, masked], -math.inf))
    assert torch.isfinite(lse[:, ~masked]).all()
    dq, dk, dv = triton_attn_bwd(torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, 4, 5)
    assert torch.equal(dq[masked], torch.zeros_like(dq[masked]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_agrees_with_torch_backend():
    """`attn_varlen(backend="triton")` and `backend="torch"` implement one contract: in
    float32 they agree on out, lse and the gradients."""
    (q, k, v, dout), meta = _inputs("T63", 4, 2, 16)
    low = [x.float() for x in (q, k, v, dout)]
    got = _triton(*low, meta, True)
    want = _torch_backend(*low, meta, True)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        # Two float32 implementations, each a few float32 ulps (~1e-7 relative) from the
        # float64 reference on O(1) values over at most 57 keys (test_matches_reference
        # bounds each): they differ by the sum, far below 1e-5.
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=1e-5, msg=name)


def test_torch_compile_fullgraph():
    """The custom ops have fake implementations: torch.compile traces forward and backward
    through `attn_varlen(backend="triton")` without a graph break (aot_eager: the tracing of
    inductor, without its code generation)."""
    (q, k, v, dout), (cu_q, cu_k, max_q, max_k) = _inputs("T17", 2, 1, 16)
    q, k, v = (x.float().to(DEVICE).requires_grad_() for x in (q, k, v))
    cu_q, cu_k = cu_q.to(DEVICE), cu_k.to(DEVICE)

    def f(q, k, v):
        out, lse = attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, True, backend="triton")
        return out.sum() + lse.sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    traced = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernels on the same data


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(k=torch.randn(5, 3, 16)), "multiple"),
        (dict(q=torch.randn(5, 4, 16, dtype=torch.float64)), "dtypes differ"),
        (dict(cu_k=torch.tensor([0, 5], dtype=torch.float32)), "cu_seqlens_k"),
        (dict(cu_k=torch.tensor([0, 2, 5], dtype=torch.int32)), "documents"),
        (dict(q=torch.randn(5, 4, 300), k=torch.randn(5, 2, 300), v=torch.randn(5, 2, 300)), "300"),
    ],
    ids=["heads", "dtype", "cu-dtype", "cu-count", "head-dim"],
)
def test_bad_input_raises(bad, match):
    args = dict(
        q=torch.randn(5, 4, 16),
        k=torch.randn(5, 2, 16),
        v=torch.randn(5, 2, 16),
        cu_q=torch.tensor([0, 5], dtype=torch.int32),
        cu_k=torch.tensor([0, 5], dtype=torch.int32),
    )
    args.update(bad)
    args["v"] = args["v"] if args["v"].shape == args["k"].shape else torch.randn_like(args["k"])
    with pytest.raises(ValueError, match=match):
        triton_attn_fwd(
            args["q"].to(DEVICE), args["k"].to(DEVICE), args["v"].to(DEVICE),
            args["cu_q"].to(DEVICE), args["cu_k"].to(DEVICE), 5, 5,
        )  # fmt: skip
