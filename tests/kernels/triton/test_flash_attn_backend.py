"""The flash-attn adapter against the float64 reference (GPU only: skipped without CUDA or
without the flash-attn package).

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), Hq query heads, K key/value
heads, D head dim.
Same 2x rule as the Triton kernels (helpers.assert_2x), the comparator being our Triton
kernels in the same dtype on the same GPU: flash-attn and they implement one contract.
"""

import math

import pytest
import torch

from tests.helpers import cu_seqlens
from tests.kernels.triton.helpers import assert_2x

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("the flash_attn backend needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flash_attn")

from kernels.attention import attn_naive, attn_varlen  # noqa: E402
from kernels.attention.flash_attn_backend import flash_attn_bwd, flash_attn_fwd  # noqa: E402

CASES = [  # (query lengths, key lengths, H, K, D)
    ([17, 63, 1, 49], [17, 63, 1, 49], 8, 2, 64),
    ([3, 20, 30, 7, 0, 3], [10, 20, 70, 2, 5, 0], 4, 1, 40),  # ragged, D not a multiple of 8
    ([130], [130], 4, 4, 128),
]


def _id(case):
    lq, lk, H, K, D = case
    return f"Tq{sum(lq)}-Tk{sum(lk)}-H{H}-K{K}-D{D}"


def _run(backend, q, k, v, dout, meta, causal):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    if backend == "naive":
        out, lse = attn_naive(q, k, v, meta[0], meta[1], causal)
    else:
        out, lse = attn_varlen(q, k, v, *meta, causal, backend=backend)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), dout.to(out)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, causal, dtype):
    lq, lk, H, K, D = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sum(lq), H, D, device="cuda", dtype=torch.float64, generator=gen)
    k = torch.randn(sum(lk), K, D, device="cuda", dtype=torch.float64, generator=gen)
    v = torch.randn(sum(lk), K, D, device="cuda", dtype=torch.float64, generator=gen)
    dout = torch.randn_like(q)
    meta = (cu_seqlens(lq, device="cuda"), cu_seqlens(lk, device="cuda"), max(lq), max(lk))
    ref = _run("naive", q, k, v, dout, meta, causal)
    low = [x.to(dtype) for x in (q, k, v, dout)]
    got = _run("flash_attn", *low, meta, causal)
    same_dtype = _run("triton", *low, meta, causal)
    for name, g, s, r in zip(("out", "lse", "dq", "dk", "dv"), got, same_dtype, ref):
        assert_2x(name, g, s, r)


def test_fully_masked_rows():
    """Lq > Lk under causal, and a document without keys: out 0, lse -inf, finite grads."""
    q = torch.randn(9, 2, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(6, 1, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu_q, cu_k = cu_seqlens([4, 3, 2], device="cuda"), cu_seqlens([1, 0, 5], device="cuda")
    out, lse = flash_attn_fwd(q, k, v, cu_q, cu_k, 4, 5, causal=True)
    masked = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool, device="cuda")
    assert torch.equal(out[masked], torch.zeros_like(out[masked]))
    assert (lse[:, masked] == -math.inf).all() and torch.isfinite(lse[:, ~masked]).all()
    grads = flash_attn_bwd(torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, 4, 5)
    assert all(torch.isfinite(g).all() for g in grads)
