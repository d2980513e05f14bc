"""Ring block plans (parallel/plans.py): exact plans for a small case, and a one-process
simulation of every ring rank's steps that must reproduce attention over the whole batch.

Tolerance of the simulation: 1e-12 relative, float64. The plans only regroup keys into
blocks whose partial softmaxes merge by LSE; rounding of that regrouping is ~1e-15.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import attn_varlen_fwd, merge_attn_partials
from parallel import SPLayout
from parallel.plans import allgather_plan, zigzag_plans
from tests.helpers import cu_seqlens


def test_zigzag_plans_one_document_of_8_over_2():
    # Rank 0 holds tokens [0, 1, 6, 7], rank 1 holds [2, 3, 4, 5].
    layout = SPLayout(cu_seqlens([8]), 8, ring=2, ulysses=1)
    own, other = zigzag_plans(layout, 0, causal=True)
    assert own.q_index is None and own.k_index is None and own.causal
    assert own.cu_seqlens_q.tolist() == [0, 4] and own.cu_seqlens_k.tolist() == [0, 4]
    # Step 1, src 1 > 0: our back chunk (local 2, 3 = tokens 6, 7) sees all of rank 1's keys.
    assert other.q_index.tolist() == [2, 3] and other.k_index is None and not other.causal
    assert other.cu_seqlens_q.tolist() == [0, 2] and other.cu_seqlens_k.tolist() == [0, 4]
    # On rank 1, step 1 (src 0 < 1): all queries see rank 0's front chunk (tokens 0, 1).
    _, other1 = zigzag_plans(layout, 1, causal=True)
    assert other1.q_index is None and other1.k_index.tolist() == [0, 1]
    assert other1.cu_seqlens_q.tolist() == [0, 4] and other1.cu_seqlens_k.tolist() == [0, 2]


def test_zigzag_steps_do_equal_work_on_a_long_document():
    # (query, key) pairs per step, causal: after the own block (the same on every rank), every
    # step is two full chunk pairs (2 c^2) on every rank: the zigzag balance.
    layout = SPLayout(cu_seqlens([64]), 64, ring=4, ulysses=1)
    c = 8
    for r in range(4):
        plans = zigzag_plans(layout, r, causal=True)
        pairs = [
            int(
                (
                    (p.cu_seqlens_q[1:] - p.cu_seqlens_q[:-1])
                    * (p.cu_seqlens_k[1:] - p.cu_seqlens_k[:-1])
                ).sum()
            )
            for p in plans[1:]
        ]
        assert pairs == [2 * c * c] * 3


def test_allgather_plan_picks_prefixes():
    # One document of 8 over 2: rank 1 holds tokens 2, 3 (front) and 4, 5 (back). Causal: the
    # front chunk sees tokens 0..3, the back chunk 0..5, as rows of the gathered buffer
    # [rank 0: 0, 1, 6, 7 | rank 1: 2, 3, 4, 5].
    layout = SPLayout(cu_seqlens([8]), 8, ring=2, ulysses=1)
    plan = allgather_plan(layout, 1, causal=True)
    assert plan.q_index is None
    assert plan.cu_seqlens_q.tolist() == [0, 2, 4] and plan.cu_seqlens_k.tolist() == [0, 4, 10]
    assert plan.k_index.tolist() == [0, 1, 4, 5, 0, 1, 4, 5, 6, 7]


def _simulate(lengths, ring, ulysses, causal, impl, hq=2, hkv=1, d=4):
    """Run every ring rank's plans in one process; compare with one attention call."""
    g = torch.Generator().manual_seed(len(lengths) * 100 + ring)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    cu = cu_seqlens(lengths)
    longest = max(lengths)
    ref_out, ref_lse = attn_varlen_fwd(q, k, v, cu, cu, longest, longest, causal, None, "torch")
    layout = SPLayout(cu, total, ring, ulysses)

    def local(x, r):
        i = layout.ring_index(r)
        out = x.new_zeros((len(i), *x.shape[1:]))
        out[i >= 0] = x[i[i >= 0]]
        return out

    for r in range(ring):
        q_l = local(q, r)
        out = torch.zeros_like(q_l)
        lse = torch.full((hq, len(q_l)), -torch.inf, dtype=torch.float64)
        if impl == "zigzag":
            plans = zigzag_plans(layout, r, causal)
            blocks = [(local(k, (r - s) % ring), local(v, (r - s) % ring)) for s in range(ring)]
        else:
            plans = [allgather_plan(layout, r, causal)]
            blocks = [tuple(torch.cat([local(x, s) for s in range(ring)]) for x in (k, v))]
        for plan, (kb, vb) in zip(plans, blocks):
            if plan.empty:
                continue
            qi = torch.arange(len(q_l)) if plan.q_index is None else plan.q_index
            ki = torch.arange(len(kb)) if plan.k_index is None else plan.k_index
            ob, lb = attn_varlen_fwd(
                q_l[qi], kb[ki], vb[ki], plan.cu_seqlens_q, plan.cu_seqlens_k,
                plan.max_seqlen_q, plan.max_seqlen_k, plan.causal, None, "torch",
            )  # fmt: skip
            out[qi], lse[:, qi] = merge_attn_partials(out[qi], lse[:, qi], ob, lb)
        i = layout.ring_index(r)
        real = i >= 0
        # Padding rows see at least themselves: finite, never -inf.
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        if real.any():
            scale = ref_out.abs().max()
            assert (out[real] - ref_out[i[real]]).abs().max() <= 1e-12 * scale
            assert (lse[:, real] - ref_lse[:, i[real]]).abs().max() <= 1e-12 * ref_lse.abs().max()


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    ring=st.integers(1, 4),
    ulysses=st.integers(1, 3),
    causal=st.booleans(),
    impl=st.sampled_from(["zigzag", "allgather"]),
)
def test_plans_reproduce_attention(lengths, ring, ulysses, causal, impl):
    _simulate(lengths, ring, ulysses, causal, impl)
