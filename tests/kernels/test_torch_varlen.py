"""The `torch_varlen` backend (torch's own CUDA varlen flash attention) on CPU and on a GPU.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), Hq query heads, K key/value
heads, D head dim.

On CPU the two aten kernel calls are replaced by `_FlashStandIn`: a float64 implementation,
written here from the flash-attention 2 conventions the adapter must meet (16-bit inputs,
head dims a multiple of 8 with a unit last stride, int32 boundaries, lse [Hq, Tq] float32 with
+inf for a row that sees no key, results in the input dtype, dk / dv in the KV heads). It
asserts every requirement, so these tests check the adapter's argument preparation and its
conversions to our contract (lse -inf, out 0, padding sliced off) against `attn_naive` +
autograd, an implementation sharing no code with either. The numerics of the real kernels are
`gpu`-marked (skipped without CUDA).
"""

import math

import pytest
import torch

from kernels.attention import attn_naive
from kernels.attention import torch_varlen_backend as tv
from tests.helpers import cu_seqlens

LAYOUTS = {  # (query lengths, key lengths)
    "packed": ([17, 63, 1, 49], [17, 63, 1, 49]),
    # Lq < Lk (bottom-right causal), Lq > Lk (rows that see no key), Lk = 0 and Lq = 0.
    "ragged": ([3, 20, 30, 7, 0, 3], [10, 20, 70, 2, 5, 0]),
}


class _FlashStandIn:
    """The two aten calls in float64, with the kernel's input checks as assertions."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        for x in (q, k, v):
            assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
            assert x.shape[-1] % 8 == 0 and x.stride(-1) == 1, (x.shape, x.stride())
        assert cu_q.dtype == cu_k.dtype == torch.int32
        assert type(max_q) is int and type(max_k) is int and type(causal) is bool
        assert type(scale) is float
        assert q.shape[1] % k.shape[1] == 0

    @staticmethod
    def _docs(q, k, v, cu_q, cu_k):
        group = q.shape[1] // k.shape[1]
        for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(),
                              cu_k[1:].tolist()):  # fmt: skip
            yield (slice(a, b), slice(c, d), q[a:b].double(),
                   k[c:d].double().repeat_interleave(group, 1),
                   v[c:d].double().repeat_interleave(group, 1))  # fmt: skip

    @staticmethod
    def _probs(q_QHD, k_CHD, causal, scale, lse_HQ=None):
        s_HQC = torch.einsum("qhd,chd->hqc", q_QHD, k_CHD) * scale
        lq, lk = q_QHD.shape[0], k_CHD.shape[0]
        if causal:
            seen = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            s_HQC = s_HQC.masked_fill(~seen, -math.inf)
        if lse_HQ is None:
            no_key_HQ = s_HQC.new_full(s_HQC.shape[:2], -math.inf)
            lse_HQ = torch.logsumexp(s_HQC, -1) if lk else no_key_HQ
            lse_HQ = lse_HQ.masked_fill(lse_HQ == -math.inf, math.inf)  # the kernel's marker
        return torch.exp(s_HQC - lse_HQ[..., None]), lse_HQ

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        self._check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        self.calls.append("fwd")
        out = torch.zeros(q.shape, dtype=torch.float64)
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float64)
        for rq, _, q_QHD, k_CHD, v_CHD in self._docs(q, k, v, cu_q, cu_k):
            p_HQC, lse[:, rq] = self._probs(q_QHD, k_CHD, causal, scale)
            out[rq] = torch.einsum("hqc,chd->qhd", p_HQC, v_CHD)
        return out.to(q.dtype), lse.float()

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        self._check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        assert dout.dtype == out.dtype == q.dtype and dout.shape == out.shape == q.shape
        assert lse.dtype == torch.float32 and lse.is_contiguous() and not (lse == -math.inf).any()
        self.calls.append("bwd")
        group = q.shape[1] // k.shape[1]
        dq = torch.zeros(q.shape, dtype=torch.float64)
        dk = torch.zeros(k.shape[0], q.shape[1], k.shape[2], dtype=torch.float64)
        dv = torch.zeros_like(dk)
        for rq, rk, q_QHD, k_CHD, v_CHD in self._docs(q, k, v, cu_q, cu_k):
            p_HQC, _ = self._probs(q_QHD, k_CHD, causal, scale, lse[:, rq].double())
            do_QHD, o_QHD = dout[rq].double(), out[rq].double()
            dp_HQC = torch.einsum("qhd,chd->hqc", do_QHD, v_CHD)
            delta_HQ = (do_QHD * o_QHD).sum(-1).t()
            ds_HQC = p_HQC * (dp_HQC - delta_HQ[..., None])
            dq[rq] = torch.einsum("hqc,chd->qhd", ds_HQC, k_CHD) * scale
            dk[rk] = torch.einsum("hqc,qhd->chd", ds_HQC, q_QHD) * scale
            dv[rk] = torch.einsum("hqc,qhd->chd", p_HQC, do_QHD)
        fold = lambda g: g.unflatten(1, (k.shape[1], group)).sum(2)  # noqa: E731
        return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@pytest.fixture
def stand_in(monkeypatch):
    kernel = _FlashStandIn()
    monkeypatch.setattr(tv, "_flash_forward", kernel.forward)
    monkeypatch.setattr(tv, "_flash_backward", kernel.backward)
    monkeypatch.setattr(tv, "_check_cuda", lambda *args: None)
    return kernel


def _inputs(layout, H, K, D, dtype, seed=0):
    lq, lk = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(n), h, D, generator=gen).to(dtype)
               for n, h in ((lq, H), (lk, K), (lk, K)))  # fmt: skip
    dout = torch.randn(sum(lq), H, D, generator=gen).to(dtype)
    meta = (cu_seqlens(lq, torch.int64), cu_seqlens(lk, torch.int64), max(lq), max(lk))
    return q, k, v, dout, meta


def _reference(q, k, v, dout, meta, causal):
    """float64 attn_naive + autograd on the same (16-bit-rounded) inputs."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    out, lse = attn_naive(q, k, v, meta[0], meta[1], causal)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), dout.double()))


def _assert_rounded_from(name, got, ref):
    """`got` is `ref` rounded once to got's dtype: within one unit in the last place (the stand-in
    computes in float64 like the reference, so only its final rounding differs; 1e-6 covers
    float64 sums that differ by reassociation around values near 0)."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite), name
    assert torch.equal(got[~finite].double(), ref[~finite]), f"{name}: infinities differ"
    ulp = torch.finfo(got.dtype).eps
    err = (got[finite].double() - ref[finite]).abs()
    assert (err <= ulp * ref[finite].abs() + 1e-6).all(), f"{name}: max error {err.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "layout, H, K, D",
    [("packed", 4, 2, 32), ("ragged", 4, 1, 20)],  # GQA; D=20 is padded to 24 for the kernel
    ids=["packed-gqa", "ragged-D20"],
)
def test_adapter_meets_the_contract(stand_in, layout, H, K, D, causal, dtype):
    q, k, v, dout, meta = _inputs(layout, H, K, D, dtype)
    out, lse = tv.torch_varlen_fwd(q, k, v, *meta, causal)
    dq, dk, dv = tv.torch_varlen_bwd(dout, q, k, v, out, lse, *meta, causal)
    assert stand_in.calls == ["fwd", "bwd"]
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(q, k, v, dout, meta, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (H, q.shape[0])
    # The contract's rows that see no key: lse -inf and out exactly 0 (the kernel says +inf).
    unseen = lse == -math.inf
    assert torch.equal(unseen, ref_lse == -math.inf)
    assert bool(unseen.any()) == (layout == "ragged")  # its Lk = 0 document, causal or not
    assert (out.transpose(0, 1)[unseen] == 0).all()
    _assert_rounded_from("lse", lse, ref_lse)
    # out reaches the backward rounded, so compare the gradients with the reference's own
    # gradients only to the rounding of the 16-bit out and dout (a few ulps of the terms).
    _assert_rounded_from("out", out, ref_out)
    for name, got, ref in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert got.shape == ref.shape and got.dtype == dtype, name
        scale = ref.abs().max().item() + 1
        # Why 8 ulps: Delta = rowsum(dout * out) uses out rounded to 16 bits (as on the GPU).
        assert (got.double() - ref).abs().max() <= 8 * torch.finfo(dtype).eps * scale, name


def test_empty_batches_launch_nothing(stand_in):
    q = torch.zeros(0, 2, 8, dtype=torch.bfloat16)
    k = torch.randn(5, 2, 8).bfloat16()
    meta = (cu_seqlens([0], torch.int64), cu_seqlens([5], torch.int64), 0, 5)
    out, lse = tv.torch_varlen_fwd(q, k, k, *meta)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    q = torch.randn(3, 2, 8).bfloat16()
    no_keys = torch.zeros(0, 2, 8, dtype=torch.bfloat16)
    meta = (cu_seqlens([3], torch.int64), cu_seqlens([0], torch.int64), 3, 0)
    out, lse = tv.torch_varlen_fwd(q, no_keys, no_keys, *meta)
    assert (out == 0).all() and (lse == -math.inf).all()
    dq, dk, dv = tv.torch_varlen_bwd(q, q, no_keys, no_keys, out, lse, *meta)
    assert (dq == 0).all() and dk.shape == (0, 2, 8)
    assert stand_in.calls == []


def test_cpu_tensors_and_float32_are_refused_in_one_line():
    q = torch.randn(4, 2, 8).bfloat16()
    meta = (cu_seqlens([4]), cu_seqlens([4]), 4, 4)
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        tv.torch_varlen_fwd(q, q, q, *meta)
    with pytest.raises(ValueError, match="dtype torch.float32 is not supported"):
        tv.torch_varlen_fwd(q.float(), q.float(), q.float(), *meta)
    assert not tv.torch_varlen_available()  # this CPU build carries no CUDA flash kernels


def test_an_lse_in_another_layout_is_a_clear_error(stand_in, monkeypatch):
    q, k, v, _, meta = _inputs("packed", 4, 2, 32, torch.bfloat16)

    def transposed(*args):
        out, lse = stand_in.forward(*args)
        return out, lse.t()

    monkeypatch.setattr(tv, "_flash_forward", transposed)
    with pytest.raises(RuntimeError, match=r"expected the varlen lse as \[Hq, Tq\]"):
        tv.torch_varlen_fwd(q, k, v, *meta)


# ---------------------------------------------------------------------------------------------
# The real kernels (GPU): same 2x rule as the Triton kernels (tests/kernels/triton/helpers),
# the comparator being the project's torch backend in the same dtype on the same GPU.
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not tv.torch_varlen_available(), reason="needs CUDA and torch's flash kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout, H, K, D", [("packed", 8, 2, 64), ("ragged", 4, 1, 40)])
def test_kernels_match_the_reference_on_gpu(layout, H, K, D, causal, dtype):
    from kernels.attention import attn_varlen
    from tests.kernels.triton.helpers import assert_2x

    q, k, v, dout, meta = _inputs(layout, H, K, D, torch.float64)
    q, k, v, dout = (x.cuda() for x in (q, k, v, dout))
    meta = (meta[0].cuda(), meta[1].cuda(), meta[2], meta[3])
    ref = _reference(q, k, v, dout, meta, causal)

    def run(backend):
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attn_varlen(*x, *meta, causal, backend=backend)
        return (out.detach(), lse.detach(), *torch.autograd.grad(out, x, dout.to(dtype)))

    got, same_dtype = run("torch_varlen"), run("torch")
    for name, a, b, r in zip(("out", "lse", "dq", "dk", "dv"), got, same_dtype, ref):
        assert_2x(f"torch_varlen {name}", a, b, r)


@pytest.mark.gpu
@pytest.mark.skipif(not tv.torch_varlen_available(), reason="needs CUDA and torch's flash kernels")
def test_partials_merged_by_lse_equal_one_call_on_gpu():
    """What ring attention does with this backend: attention over two halves of the keys,
    merged by lse under autograd (the lse gradient reaches q and k), equals one call."""
    from kernels.attention import attn_varlen, merge_attn_partials

    gen = torch.Generator(device="cuda").manual_seed(0)
    T, H, K, D = 256, 8, 2, 64
    q, k, v = (torch.randn(T, h, D, device="cuda", generator=gen, dtype=torch.bfloat16)
               for h in (H, K, K))  # fmt: skip
    dout = torch.randn(T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    cu = cu_seqlens([T], device="cuda")
    cu_half = cu_seqlens([T // 2], device="cuda")

    def grads(merged: bool):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if not merged:
            out, _ = attn_varlen(*x, cu, cu, T, T, False, backend="torch_varlen")
        else:
            halves = [
                attn_varlen(x[0], x[1][s], x[2][s], cu, cu_half, T, T // 2, False,
                            backend="torch_varlen")
                for s in (slice(0, T // 2), slice(T // 2, T))
            ]  # fmt: skip
            out, _ = merge_attn_partials(*halves[0], *halves[1])
        return (out.float(), *(g.float() for g in torch.autograd.grad(out, x, dout)))

    for name, a, b in zip(("out", "dq", "dk", "dv"), grads(True), grads(False)):
        # Both are bf16 results of float32 accumulations, but the merged path rounds more: out
        # per half and merged, dq / dk as two bf16 terms (out's and lse's) added. With the torch
        # backend on CPU the same test measured 1.4, 1.0, 4.1 and 2.4 bf16 units (2^-8 of the
        # largest value) for out, dq, dk, dv; a lost lse gradient is off by O(1) of it.
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 8 * 2**-8 * scale, f"{name}: {err:.3g} against max |value| {scale:.3g}"
