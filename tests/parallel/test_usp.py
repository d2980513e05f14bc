"""Attention-level equivalence of every SP method against one process (float64, gloo).

`usp_attn_varlen_func` is the entry of all four methods (Ulysses: ring = 1; ring: ulysses =
1; USP: both), so this file covers parallel/ulysses.py, ring.py, ring_allgather.py and
usp.py. Cases are grouped into one spawn per world size (spawning costs seconds).

Tolerance: 1e-10 relative to the largest reference value. Everything is float64; SP only
reorders sums (blockwise softmax merged by LSE, gradients summed across ranks), whose
rounding is ~1e-15 relative here, so 1e-10 leaves a wide margin yet catches any real
mismatch (a wrong mask or a lost block gives errors of order 1e-2 and above).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel import ParallelDims, ulysses_attn_varlen_func
from tests.parallel.sp_cases import Config, run_sp_case
from tests.spawn import spawn

pytestmark = pytest.mark.distributed

RTOL = 1e-10
GQA = ((4, 4), (4, 2), (4, 1))  # (query heads, KV heads): ratios 1, 2, 4

LAYOUTS = {  # world size -> [(name, config)]
    2: [
        ("ulysses2", Config("ulysses", ulysses=2)),
        ("ring2-zigzag", Config("ring", ring=2)),
        ("ring2-allgather", Config("ring", ring=2, ring_impl="allgather")),
    ],
    4: [
        ("ulysses4", Config("ulysses", ulysses=4)),
        ("ring4-zigzag", Config("ring", ring=4)),
        ("ring4-allgather", Config("ring", ring=4, ring_impl="allgather")),
        ("usp2x2-zigzag", Config("usp", ulysses=2, ring=2)),
        ("usp2x2-allgather", Config("usp", ulysses=2, ring=2, ring_impl="allgather")),
        ("dp2-ulysses2", Config("ulysses", ulysses=2)),
    ],
}


def _impossible_heads(group) -> str:
    """A direct call of ulysses_attn_varlen_func with 3 query heads over the group: the error
    (raised on every rank before any collective, so no rank waits on another)."""
    q, kv = torch.zeros(4, 3, 2), torch.zeros(4, 1, 2)
    try:
        ulysses_attn_varlen_func(group, q, kv, kv, inner=None)
    except ValueError as e:
        return str(e)
    return "no error"


def _worker(rank: int, world_size: int) -> dict:
    results = {}
    for name, cfg in LAYOUTS[world_size]:
        dp = 2 if name.startswith("dp2") else None
        dims = ParallelDims(world_size, ulysses=cfg.ulysses, ring=cfg.ring, dp=dp)
        dims.build_mesh("cpu")
        if name.startswith("ulysses"):
            results["impossible_heads"] = _impossible_heads(dims.ulysses_group)
        for hq, hkv in GQA:
            dims.validate(hq, hkv)
            for causal in (True, False):
                case = f"{name}-Hq{hq}-Hkv{hkv}-{'causal' if causal else 'full'}"
                results[case] = run_sp_case(dims, cfg, hq, hkv, causal)
        dist.barrier()
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_sp_attention_equals_one_process(world_size):
    per_rank = spawn(_worker, world_size, timeout=300)
    u = world_size  # the "ulysses<world size>" layout made the call
    for rank, results in enumerate(per_rank):
        # The direct caller gets the rule of ParallelDims.validate, with the valid degrees.
        assert results.pop("impossible_heads") == (
            f"ulysses={u} needs query heads (3) divisible by {u}; valid degrees: 1, 3"
        )
        assert len(results) == len(LAYOUTS[world_size]) * len(GQA) * 2
        for case, r in results.items():
            where = f"rank {rank} {case}"
            for key in ("out", "lse", "dq", "dk", "dv"):
                assert r[key] <= RTOL, f"{where}: {key} relative error {r[key]:.3e}"
            assert r["pad_out_finite"], where
            # Padding rows get dout 0 and are seen only by padding: their grads are exactly 0.
            assert r["pad_grads_zero"], where
            # Collective counts per attention call (e.g. Ulysses: 2 all-to-alls each way,
            # since q, k, v travel in one) and bytes equal the analytic formula exactly.
            assert r["fwd_calls"] == r["want_fwd_calls"], where
            assert r["bwd_calls"] == r["want_bwd_calls"], where
            assert r["fwd_bytes"] == r["want_fwd_bytes"], where
            assert r["fwd_recv"] == r["fwd_bytes"], where
            assert r["bwd_bytes"] == r["want_bwd_bytes"], where
