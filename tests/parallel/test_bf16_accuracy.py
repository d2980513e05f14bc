"""bf16 accuracy of sequence-parallel attention (issue 12): every SP layout's error against
float64 stays within 2x the error of single-process bf16 attention (MagiAttention's rule).

Legend: T tokens of the batch, Hq query heads, K KV heads, D head dim, L one document's tokens.

Inputs are bf16 (packed documents, GQA, causal). The reference is float64 attention of those
very bf16 values (exactly upcast), written out densely below with no kernel code, so an error
measures what a computation adds, not the rounding of its inputs. err_single: the `torch`
backend's `attn_varlen` in one process; err_sp: `usp_attn_varlen_func` (what
`parallel.apply`'s SPAttention calls) over the layout, its shards gathered back.

The metric is the relative L2 (Frobenius) error, ||got - ref|| / ||ref||, over all real
tokens, for out, dq, dk and dv. MagiAttention compares infinity norms (the largest element
error, relative to the largest reference value); in bf16 that is one element's rounding, and
it misjudges both ways here: ring2's largest dq error is 2.2x one process's while its L2 error
is 1.19x (the element where the two blocks' partial dq cancel), and the bf16-arithmetic
control below has largest dk / dv errors of only 1.5x / 1.2x while its L2 errors are 2.4x /
2.1x. The L2 norm averages the rounding of every element and measures the precision of the
computation. Loss of precision is global (an accumulator or a merge in bf16 touches every
row); wrong masks or lost blocks are the float64 equivalence tests' job (test_usp.py, 1e-10).

Two checks keep the rule from passing vacuously: err_single is of bf16 size (neither 0, which
would make 2x meaningless, nor large), and a layout whose attention runs in bf16 arithmetic
(Ulysses around `attn_naive` on bf16: scores, softmax and sums rounded to bf16) must fail it.
It does for out and dq (measured 3.7-3.9x and 3.2-3.5x); its dk and dv land at 2.4x and
1.9-2.1x, so the 2x rule is only just able to see that slip in the K/V gradients, and they are
not asserted on the control.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kernels.attention import attn_naive, attn_varlen
from parallel import ParallelDims, shard_packed, ulysses_attn_varlen_func, usp_attn_varlen_func
from tests.helpers import cu_seqlens
from tests.parallel.sp_cases import Config
from tests.spawn import spawn

pytestmark = pytest.mark.distributed

# Odd lengths; the 70-token document spans both shards; the 1-token one is shorter than a
# zigzag chunk.
DOC_LENGTHS = (37, 1, 70, 21, 33)
HEAD_DIM = 16
GQA = ((4, 2), (4, 1))  # (Hq, K): KV heads split by Ulysses 2, and replicated (K < P)
NAMES = ("out", "dq", "dk", "dv")
# bf16 unit roundoff (2^-8): the relative error of one rounding is at most this.
BF16_U = 2.0**-8
# USP 2 x 2 is left out: it needs 4 processes (1.5x this file's CPU time, which is mostly
# process start-up), and its precision is its ring's, since the Ulysses all-to-alls only copy
# (measured with 4 processes: usp2x2 at 0.99x-1.19x of one process, as ring2-zigzag).
LAYOUTS = {
    "ulysses2": Config("ulysses", ulysses=2),
    "ring2-zigzag": Config("ring", ring=2),
    "ring2-allgather": Config("ring", ring=2, ring_impl="allgather"),
}
CONTROL = "ulysses2-naive-bf16"  # the deliberately imprecise layout


def _batch(num_heads: int, num_kv_heads: int):
    """(cu_seqlens, q, k, v, dout) in bf16, identical on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    T = sum(DOC_LENGTHS)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(T, heads, HEAD_DIM, generator=g).to(torch.bfloat16)

    q, k, v = rand(num_heads), rand(num_kv_heads), rand(num_kv_heads)
    return cu_seqlens(DOC_LENGTHS), q, k, v, rand(num_heads)


def _reference(cu, q, k, v, dout) -> list[torch.Tensor]:
    """float64 (out, dq, dk, dv): per document, dense causal softmax attention; GQA by
    repeating KV heads; gradients by autograd."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        k_LHD = k[lo:hi].repeat_interleave(group, dim=1)
        v_LHD = v[lo:hi].repeat_interleave(group, dim=1)
        s_HLL = torch.einsum("qhd,khd->hqk", q[lo:hi], k_LHD) / HEAD_DIM**0.5
        future = torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1)
        p_HLL = s_HLL.masked_fill(future, float("-inf")).softmax(dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", p_HLL, v_LHD))
    out = torch.cat(outs)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout.double())]


def _rel_l2(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    return {n: float((g.double() - w).norm() / w.norm()) for n, g, w in zip(NAMES, got, want)}


def _single(cu, q, k, v, dout) -> list[torch.Tensor]:
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    longest = max(DOC_LENGTHS)
    out, _ = attn_varlen(q, k, v, cu, cu, longest, longest, True, None, "torch")
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def _naive_bf16_ulysses(dims, meta, q, k, v):
    """Ulysses around `attn_naive` on the gathered bf16 tensors: math in bf16."""
    m = meta.gathered_meta(q.device)

    def inner(q_g, k_g, v_g):
        return attn_naive(q_g, k_g, v_g, m.cu_seqlens_q, m.cu_seqlens_k, True)

    return ulysses_attn_varlen_func(dims.ulysses_group, q, k, v, inner)[0]


def _sp(dims, cfg, cu, q, k, v, dout, naive: bool = False) -> list[torch.Tensor]:
    """One SP forward/backward; (out, dq, dk, dv) of every real token gathered over SP, in
    float64 (exact: each token comes from one rank, the others add zeros)."""
    layout = shard_packed(cu, q.shape[0], dims, cfg)
    q_l, k_l, v_l = (layout.take(x, 0.0).requires_grad_() for x in (q, k, v))
    if naive:
        out_l = _naive_bf16_ulysses(dims, layout.attn_meta, q_l, k_l, v_l)
    else:
        groups = (dims.ulysses_group, dims.ring_group)
        out_l, _ = usp_attn_varlen_func(
            *groups, q_l, k_l, v_l, layout.attn_meta, True, None, "torch", cfg.ring_impl
        )
    local = [out_l.detach(), *torch.autograd.grad(out_l, (q_l, k_l, v_l), layout.take(dout, 0))]
    idx = layout.local_index_T
    real = idx >= 0
    full = []
    for x_l, like in zip(local, (q, q, k, v)):
        x = torch.zeros(like.shape, dtype=torch.float64)
        x[idx[real]] = x_l[real].double()
        dist.all_reduce(x, group=dims.sp_group)
        full.append(x)
    return full


def _worker(rank: int, world_size: int) -> dict:
    results = {}
    for hq, hkv in GQA:
        cu, q, k, v, dout = _batch(hq, hkv)
        ref = _reference(cu, q, k, v, dout)
        case = f"Hq{hq}-K{hkv}"
        results[(case, "single")] = _rel_l2(_single(cu, q, k, v, dout), ref)
        for name, cfg in LAYOUTS.items():
            dims = ParallelDims(world_size, ulysses=cfg.ulysses, ring=cfg.ring)
            dims.validate(hq, hkv)
            dims.build_mesh("cpu")
            results[(case, name)] = _rel_l2(_sp(dims, cfg, cu, q, k, v, dout), ref)
            if name == "ulysses2":
                got = _sp(dims, cfg, cu, q, k, v, dout, naive=True)
                results[(case, CONTROL)] = _rel_l2(got, ref)
    return results


def test_sp_bf16_error_within_twice_single_process():
    per_rank = spawn(_worker, 2, timeout=300)
    for rank, results in enumerate(per_rank):
        assert len(results) == len(GQA) * (len(LAYOUTS) + 2)
        for hq, hkv in GQA:
            case = f"Hq{hq}-K{hkv}"
            single = results[(case, "single")]
            for n in NAMES:
                # One process accumulates in float32 and rounds out and each gradient to bf16,
                # plus the CPU kernel's own roundings inside: measured 0.45u-1.1u. Below u/16
                # nothing was rounded to bf16 and the 2x rule would compare noise; above 4u
                # bf16 is not the cause.
                assert BF16_U / 16 < single[n] < 4 * BF16_U, f"{case} single {n}: {single[n]:.3e}"
            for name in LAYOUTS:
                sp = results[(case, name)]
                for n in NAMES:
                    where = f"rank {rank} {case} {name} {n}"
                    # The layout rounded to bf16 too (else it would pass for the wrong reason).
                    assert sp[n] > BF16_U / 16, f"{where}: {sp[n]:.3e}, not a bf16 error"
                    # MagiAttention's rule. SP adds roundings of its own: ring blocks return
                    # bf16 outputs that merge in float32 and round again, per-block dq/dk/dv
                    # round before their float32 sum (measured: at most 1.19x; with blocks
                    # computed exactly and rounded only at their outputs, 1.8x, since the
                    # kernel's inner roundings no longer dilute these).
                    assert sp[n] <= 2 * single[n], (
                        f"{where}: relative L2 error {sp[n]:.3e} > 2 x single process "
                        f"{single[n]:.3e}"
                    )
            # The rule can fail: attention in bf16 arithmetic breaks it (a score rounded to
            # bf16 moves its softmax weight by up to 2^-8 times the score, and each output
            # sums bf16 products in bf16). dk and dv: see the module doc.
            control = results[(case, CONTROL)]
            for n in ("out", "dq"):
                assert control[n] > 2 * single[n], (
                    f"rank {rank} {case} control {n}: {control[n]:.3e} does not exceed "
                    f"2 x {single[n]:.3e}; the rule could not catch a bf16 layout"
                )
