"""merge_attn_partials: two partials over disjoint key sets merge into attention over the union.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), Hq query heads, K kv heads,
D head dim.
"""

import pytest
import torch

from kernels.attention import attn_naive, attn_varlen, merge_attn_partials
from tests.helpers import cu_seqlens

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see tests/conftest.py


def _split_keys(x_TKD, lk, cut):
    """Per document b, keys [0, cut[b]) go to side a and the rest to side b."""
    starts = [0, *torch.tensor(lk).cumsum(0).tolist()]
    a = [x_TKD[s : s + c] for s, c in zip(starts, cut)]
    b = [x_TKD[s + c : e] for s, c, e in zip(starts, cut, starts[1:])]
    return torch.cat(a), torch.cat(b)


# (query lengths, key lengths, where each document's keys are cut, H, K, D); cuts at 0 and at
# Lk leave one side empty for that document (its lse is -inf there).
CASES = [
    ([5, 9, 1], [5, 9, 1], [2, 0, 1], 4, 2, 16),
    ([7, 3, 12], [13, 8, 12], [6, 8, 0], 2, 1, 40),
]


def _case_id(case):
    lq, lk, cut, H, K, D = case
    return f"q{'.'.join(map(str, lq))}-cut{'.'.join(map(str, cut))}-H{H}-K{K}-D{D}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_full_attention_halves_merge_to_whole_with_grads(case):
    lq, lk, cut, H, K, D = case
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lk), K, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lk), K, D, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(sum(lq), H, D, generator=gen, dtype=torch.float64)
    (k_a, k_b), (v_a, v_b) = _split_keys(k, lk, cut), _split_keys(v, lk, cut)
    cu_q, rest = cu_seqlens(lq), [n - c for n, c in zip(lk, cut)]
    out_a, lse_a = attn_varlen(q, k_a, v_a, cu_q, cu_seqlens(cut), max(lq), max(cut), False)
    out_b, lse_b = attn_varlen(q, k_b, v_b, cu_q, cu_seqlens(rest), max(lq), max(rest), False)
    assert lse_a.isneginf().any() or lse_b.isneginf().any()  # the case has an empty side
    out, lse = merge_attn_partials(out_a, lse_a, out_b, lse_b)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_lse = attn_naive(q, k, v, cu_q, cu_seqlens(lk), False)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    # float64; a handful of exp/log steps separate the two: ~1e-15, far below 1e-12.
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    # The gradients flow through both partials' lse (attn_varlen's lse gradient).
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_causal_prefix_and_square_merge_to_bottom_right_causal():
    # Ring-style split of a document with Lq < Lk: the first Lk - Lq keys are seen in full,
    # the last Lq keys causally; merged, they equal bottom-right causal attention.
    lq, lk = [6, 4], [15, 4]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(10, 3, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(19, 3, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(19, 3, 8, generator=gen, dtype=torch.float64)
    cut = [n - m for n, m in zip(lk, lq)]
    (k_a, k_b), (v_a, v_b) = _split_keys(k, lk, cut), _split_keys(v, lk, cut)
    out_a, lse_a = attn_varlen(q, k_a, v_a, cu_seqlens(lq), cu_seqlens(cut), 6, 9, False)
    out_b, lse_b = attn_varlen(q, k_b, v_b, cu_seqlens(lq), cu_seqlens(lq), 6, 6, True)
    out, lse = merge_attn_partials(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = attn_naive(q, k, v, cu_seqlens(lq), cu_seqlens(lk), True)
    # float64, reassociation only.
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)


def test_one_side_empty_is_exact_and_both_empty_is_zero():
    gen = torch.Generator().manual_seed(2)
    out_a = torch.randn(5, 2, 4, generator=gen, requires_grad=True)
    lse_a = torch.randn(2, 5, generator=gen)
    lse_a[1, 3] = -torch.inf  # this row is empty on both sides
    lse_a.requires_grad_()
    out_b = torch.randn(5, 2, 4, generator=gen, requires_grad=True)
    lse_b = torch.full((2, 5), -torch.inf, requires_grad=True)
    out, lse = merge_attn_partials(out_a, lse_a, out_b, lse_b)
    seen = ~lse_a.isneginf().t()
    # Weights are exactly 1 and 0 here: nothing is rounded, so equality is exact.
    assert torch.equal(out[seen], out_a[seen]) and torch.equal(lse, lse_a)
    assert torch.equal(out[3, 1], torch.zeros(4))
    assert lse[1, 3] == -torch.inf
    grads = torch.autograd.grad(
        (out * out).sum() + lse.nan_to_num(neginf=0).sum(), (out_a, lse_a, out_b, lse_b)
    )
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[2], torch.zeros_like(out_b))  # an empty side gets no gradient


def test_dtypes_and_shapes():
    gen = torch.Generator().manual_seed(3)
    out_a = torch.randn(3, 2, 4, generator=gen).bfloat16()
    out_b = torch.randn(3, 2, 4, generator=gen).bfloat16()
    lse_a, lse_b = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    out, lse = merge_attn_partials(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out64, lse64 = merge_attn_partials(
        out_a.double(), lse_a.double(), out_b.double(), lse_b.double()
    )
    assert out64.dtype == lse64.dtype == torch.float64
    # The float32 math of the bf16 merge differs from float64 only by bf16 output rounding.
    torch.testing.assert_close(out.double(), out64, rtol=2**-8, atol=0)
    with pytest.raises(ValueError, match=r"\[Hq, T\]"):
        merge_attn_partials(out_a, lse_a.t(), out_b, lse_b)
    with pytest.raises(ValueError, match=r"\(3, 2, 4\) and \(3, 2, 5\)"):
        merge_attn_partials(out_a, lse_a, torch.zeros(3, 2, 5), lse_b)
