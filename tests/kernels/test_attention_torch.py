"""The attention contract on CPU: the `torch` backend (both paths) against the naive reference.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), Hq query heads, K kv heads,
D head dim.
"""

import math

import pytest
import torch

from kernels.attention import (
    VarlenAttention,
    VarlenMeta,
    attn_naive,
    attn_varlen,
    attn_varlen_bwd,
    attn_varlen_fwd,
    resolve_backend,
)
from kernels.attention.torch_blockwise import (
    blockwise_attn_bwd,
    blockwise_attn_fwd,
    torch_attn_bwd,
    torch_attn_fwd,
)
from tests.helpers import cu_seqlens

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see tests/conftest.py

# (query lengths, key lengths, H, K, D): odd sizes on purpose; empty documents on both sides.
CASES = [
    ([1, 7, 33, 64, 130, 0], [1, 7, 33, 64, 130, 0], 4, 4, 16),  # GQA 1, an empty doc
    ([1, 7, 33, 0, 64, 130, 5], [1, 7, 33, 4, 64, 130, 0], 4, 2, 40),  # Lq=0 and Lk=0 docs
    ([3, 10, 20, 1], [9, 10, 61, 130], 4, 1, 64),  # Lq < Lk: bottom-right; GQA 4
    ([9, 7, 7, 7], [4, 7, 7, 7], 2, 1, 16),  # Lq > Lk; equal docs batched into one call
    ([5, 5, 6, 6], [12, 12, 6, 6], 6, 3, 40),  # several Lq < Lk docs of one shape
    ([45], [45], 4, 2, 40),  # one document: one op call, its outputs returned as they are
    ([7, 7, 7], [7, 7, 7], 2, 1, 16),  # equal documents: the same single call
]


def _case_id(case) -> str:
    lq, lk, H, K, D = case
    return f"q{'.'.join(map(str, lq))}-k{'.'.join(map(str, lk))}-H{H}-K{K}-D{D}"


def _inputs(case, dtype=torch.float64, seed=0):
    lq, lk, H, K, D = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lk), K, D, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lk), K, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(sum(lq), H, D, generator=gen, dtype=torch.float64)
    meta = (cu_seqlens(lq), cu_seqlens(lk), max(lq), max(lk))
    return [x.to(dtype) for x in (q, k, v, dout)], meta


def _naive_with_grads(q, k, v, dout, meta, causal):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = attn_naive(q, k, v, meta[0], meta[1], causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse.detach(), dq, dk, dv


def _blockwise_fwd(*args):
    return blockwise_attn_fwd(*args, block_q=16, block_k=24)  # small tiles: many of them


def _blockwise_bwd(*args):
    return blockwise_attn_bwd(*args, block_q=16, block_k=24)


IMPLS = {
    "cpu_flash": (torch_attn_fwd, torch_attn_bwd),
    "blockwise": (_blockwise_fwd, _blockwise_bwd),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp64_matches_naive(case, causal, impl):
    (q, k, v, dout), meta = _inputs(case)
    fwd, bwd = IMPLS[impl]
    out, lse = fwd(q, k, v, *meta, causal, None)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, *meta, causal, None)
    ref = _naive_with_grads(q, k, v, dout, meta, causal)
    # Outputs are allocated NaN-filled: a row that was never written would show up here.
    for got in (out, dq, dk, dv):
        assert not got.isnan().any()
    assert lse.dtype == torch.float64 and dk.shape == k.shape and dv.shape == v.shape
    # Rows that see no key: lse exactly -inf, out exactly 0, in the same places as the reference.
    assert torch.equal(lse.isneginf(), ref[1].isneginf())
    assert torch.equal(out[lse.isneginf().t()], torch.zeros_like(out[lse.isneginf().t()]))
    finite = ~ref[1].isneginf()
    # float64 both sides; only the summation order differs: ~1e-15 per op, far below 1e-12.
    torch.testing.assert_close(lse[finite], ref[1][finite], rtol=0, atol=1e-12)
    for got, want in zip((out, dq, dk, dv), (ref[0], *ref[2:])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _errors(dtype, case, causal):
    """Max abs error vs float64 naive of (out, dq, dk, dv): our kernel and naive in `dtype`."""
    (q, k, v, dout), meta = _inputs(case, seed=1)
    ref = _naive_with_grads(q, k, v, dout, meta, causal)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    naive = _naive_with_grads(*low, meta, causal)
    qg, kg, vg = (x.clone().requires_grad_() for x in low[:3])
    out, lse = attn_varlen(qg, kg, vg, *meta, causal)
    ours = (out, *torch.autograd.grad(out, (qg, kg, vg), low[3]))
    assert lse.dtype == torch.float32 and out.dtype == dtype
    wants = (ref[0], *ref[2:])
    err = [(g.double() - w).abs().max().item() for g, w in zip(ours, wants)]
    err_naive = [(g.double() - w).abs().max().item() for g, w in zip((naive[0], *naive[2:]), wants)]
    return err, err_naive, [w.abs().max().item() for w in wants]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES[1:3], ids=_case_id)
def test_bf16_error_at_most_twice_naive(case, causal):
    err, err_naive, _ = _errors(torch.bfloat16, case, causal)
    # The flash-attention rule: fp32 accumulation must not be worse than 2x a bf16 naive.
    for name, e, n in zip(("out", "dq", "dk", "dv"), err, err_naive):
        assert e <= 2 * n, f"{name}: error {e:.3g} > 2 x naive bf16 error {n:.3g}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES[1:3], ids=_case_id)
def test_fp32_error_at_most_twice_naive(case, causal):
    err, err_naive, scale = _errors(torch.float32, case, causal)
    eps = torch.finfo(torch.float32).eps
    for name, e, n, s in zip(("out", "dq", "dk", "dv"), err, err_naive, scale):
        # In fp32 both errors are a few ulps and their ratio is noise, so the 2x rule gets a
        # floor of 4 ulps of the largest reference value.
        assert e <= 2 * n + 4 * eps * s, f"{name}: error {e:.3g} vs naive fp32 {n:.3g}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck_T9_H2_K1_D4(causal):
    # Lq < Lk, Lq > Lk and Lq == Lk documents; every query sees a key, so lse is finite and
    # is checked as an output too (its gradient path is the extra backward call).
    lq, lk = [2, 4, 3], [5, 2, 3]
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lq), 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    meta = (cu_seqlens(lq), cu_seqlens(lk), 4, 5)
    if causal:  # causal Lq > Lk leaves rows without keys (lse -inf): check out alone there
        assert torch.autograd.gradcheck(lambda *x: attn_varlen(*x, *meta, True)[0], (q, k, v))
        meta = (cu_seqlens([2, 3]), cu_seqlens([5, 3]), 3, 5)
        q, k = q[:5].detach().requires_grad_(), k[:8].detach().requires_grad_()
        v = v[:8].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: attn_varlen(*x, *meta, causal), (q, k, v))


@pytest.mark.parametrize("lq", [[6, 11], [17]], ids=["T17-docs2", "T17-docs1"])
@pytest.mark.parametrize("impl", ["public", "blockwise"])
def test_softmax_scale_and_noncontiguous_inputs(impl, lq):
    # q, k, v as strided views of one fused projection, as a model produces them.
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(17, 4 + 2 + 2, 8, generator=gen, dtype=torch.float64)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    meta = (cu_seqlens(lq), cu_seqlens(lq), 17, 17)
    fwd, bwd = (attn_varlen_fwd, attn_varlen_bwd) if impl == "public" else IMPLS[impl]
    backend = ("torch",) if impl == "public" else ()
    out, lse = fwd(q, k, v, *meta, True, 0.3, *backend)
    ref_out, ref_lse = attn_naive(q, k, v, meta[0], meta[1], True, 0.3)
    # float64, summation order only.
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    dout = torch.randn(17, 4, 8, generator=gen, dtype=torch.float64).transpose(0, 1)
    dout = dout.contiguous().transpose(0, 1)  # a non-contiguous upstream gradient
    grads = bwd(dout, q, k, v, out, lse, *meta, True, 0.3, *backend)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(
        attn_naive(qr, kr, vr, meta[0], meta[1], True, 0.3)[0], (qr, kr, vr), dout
    )
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim():
    (q, k, v, _), meta = _inputs(CASES[0])
    a = attn_varlen_fwd(q, k, v, *meta, True, None, "torch")
    b = attn_varlen_fwd(q, k, v, *meta, True, 1 / math.sqrt(q.shape[-1]), "torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same computation, bit for bit


def test_varlen_attention_module():
    (q, k, v, _), meta = _inputs(CASES[2])
    module = VarlenAttention(backend="torch")
    out = module(q, k, v, VarlenMeta(*meta), causal=True)
    assert torch.equal(out, attn_varlen(q, k, v, *meta, True, None, "torch")[0])
    assert "torch" in repr(module)
    with pytest.raises(ValueError, match="cuda_graph"):
        VarlenAttention(backend="cuda_graph")


def test_resolve_backend(monkeypatch):
    from kernels.attention import dispatch

    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    # auto on CUDA, 16-bit: flash-attn, else torch's own flash kernels, else triton.
    monkeypatch.setattr(dispatch, "_HAS_FLASH_ATTN", True)
    monkeypatch.setattr(dispatch, "_HAS_TORCH_FLASH", True)
    assert resolve_backend("auto", "cuda") == "flash_attn"
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "flash_attn"
    monkeypatch.setattr(dispatch, "_HAS_FLASH_ATTN", False)
    assert resolve_backend("auto", "cuda:1", torch.float16) == "torch_varlen"
    monkeypatch.setattr(dispatch, "_HAS_TORCH_FLASH", False)
    assert resolve_backend("auto", "cuda:1") == "triton"
    # The flash kernels take no float32 / float64, whatever is installed.
    monkeypatch.setattr(dispatch, "_HAS_FLASH_ATTN", True)
    assert resolve_backend("auto", "cuda", torch.float32) == "triton"
    assert resolve_backend("auto", "cuda", torch.float64) == "torch"
    for cuda_only in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match=f"'{cuda_only}' needs CUDA"):
            resolve_backend(cuda_only, "cpu")
    with pytest.raises(ValueError, match="'xformers'"):
        resolve_backend("xformers", "cpu")


def test_the_backend_choice_is_described_with_its_reason(monkeypatch):
    from kernels.attention import dispatch

    monkeypatch.setattr(dispatch, "_HAS_FLASH_ATTN", False)
    monkeypatch.setattr(dispatch, "_HAS_TORCH_FLASH", True)
    line = dispatch.describe_backend_choice("auto", "cuda", torch.bfloat16)
    assert line == (
        "attention: torch_varlen (auto on cuda: flash-attn is not installed; torch's flash "
        "kernels are)"
    )
    assert dispatch.describe_backend_choice("auto", "cpu") == "attention: torch (auto on cpu)"
    assert dispatch.describe_backend_choice("triton", "cuda") == "attention: triton (as configured)"


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


def _bad(**change):
    (q, k, v, _), (cu_q, cu_k, mq, mk) = _inputs(CASES[3])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq)
    args.update(max_seqlen_k=mk, **change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.zeros(30, 2)), r"\[Tq, Hq, D\]"),
        (dict(k=_zeros(25, 1, 8)), "head dim"),
        (dict(q=_zeros(30, 3, 16), k=_zeros(25, 2, 16), v=_zeros(25, 2, 16)), "of kv heads"),
        (dict(q=torch.zeros(30, 2, 16, dtype=torch.float32)), "dtype"),
        (dict(cu_seqlens_q=torch.tensor([0, 9, 16, 23, 30.0])), "int32 or int64"),
        (dict(cu_seqlens_q=torch.tensor([[0, 30]], dtype=torch.int32)), "1-D"),
        (dict(cu_seqlens_q=torch.tensor([0, 30], dtype=torch.int32)), "same number"),
        (dict(cu_seqlens_q=torch.tensor([0, 9, 20, 16, 30], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([1, 9, 16, 23, 30], dtype=torch.int32)), "from 0 to 30"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 11, 18, 24], dtype=torch.int32)), "from 0 to 25"),
        (dict(max_seqlen_q=8), "9 tokens > max_seqlen 8"),
        (dict(backend="xformers"), "'xformers'"),
    ],
    ids=[
        "rank",
        "head-dim",
        "heads",
        "dtype",
        "cu-float",
        "cu-2d",
        "doc-count",
        "decreasing",
        "start",
        "end",
        "max-seqlen",
        "backend",
    ],
)
def test_bad_input_raises(change, message):
    with pytest.raises(ValueError, match=message):
        attn_varlen(**_bad(**change))


def test_compile_fullgraph_aot_eager():
    # The custom op keeps torch.compile from tracing into the backend (no graph break).
    (q, k, v, dout), meta = _inputs(CASES[3], dtype=torch.float32)
    module = VarlenAttention(backend="torch")

    def f(q, k, v):
        return module(q * 1.5, k, v, VarlenMeta(*meta))

    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*qs)
    grads = torch.autograd.grad(out, qs, dout)
    qe = [x.clone().requires_grad_() for x in (q, k, v)]
    out_e = f(*qe)
    grads_e = torch.autograd.grad(out_e, qe, dout)
    # Same kernels in the same order: bit-for-bit.
    assert torch.equal(out, out_e)
    for a, b in zip(grads, grads_e):
        assert torch.equal(a, b)


def test_compile_fullgraph_without_autograd():
    # attn_varlen_fwd / _bwd (what ring attention drives block by block) run as the same
    # custom ops under torch.compile: no graph break, and bit-for-bit the eager result.
    (q, k, v, dout), meta = _inputs(CASES[3], dtype=torch.float32)

    def f(q, k, v, dout):
        out, lse = attn_varlen_fwd(q, k, v, *meta, True, None, "torch")
        return out, lse, *attn_varlen_bwd(dout, q, k, v, out, lse, *meta, True, None, "torch")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, dout)
    for a, b in zip(compiled, f(q, k, v, dout), strict=True):
        assert torch.equal(a, b)
