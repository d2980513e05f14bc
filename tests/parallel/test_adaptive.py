"""Adaptive placement (parallel/adaptive.py, work in progress for issue 16): the placement
rule, and at model level the tiny Llama fed adaptive shards gives the loss and every
parameter gradient of one process, for all-local, all-split and mixed batches.

Tolerance: 1e-10 relative, as tests/parallel/test_apply.py (float64; only sums reorder).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import parallel
from kernels.attention import VarlenMeta
from longtrain.model import build_model
from parallel import ParallelDims
from parallel.adaptive import (
    adaptive_attn_varlen_func,
    place_documents,
    shard_packed_adaptive,
    split_local_tokens,
)
from parallel.sharding import SPLayout
from tests.parallel.sp_cases import DOC_LENGTHS, Config, make_batch, reference, rel_err
from tests.parallel.test_apply import _batch, _loss_and_grads, _model_cfg
from tests.spawn import spawn

RTOL = 1e-10


def test_short_documents_stay_whole_and_balance_attention_cost():
    p = place_documents([5, 100, 3, 3, 7, 0, 50], 10, ring=1, ulysses=2, capacity=168)
    assert p.split == [1, 5, 6]  # longer than the threshold, or empty
    # LPT on L^2: 7 -> rank 0 (49); 5, 3, 3 -> rank 1 (25 + 9 + 9 = 43).
    assert p.local(0) == [4] and p.local(1) == [0, 2, 3]
    assert place_documents([4] * 8, 4, 2, 2, capacity=32).owner == (0, 1, 2, 3, 0, 1, 2, 3)
    assert place_documents([9, 9], 8, ring=2, ulysses=1, capacity=18).split == [0, 1]


def test_no_rank_holds_more_than_the_fixed_layout():
    """The capacity: the fixed layout gives each of 2 ranks 65 of these 130 tokens. Kept
    whole, the long document would give its rank 100 (with capacity 80, over): it is split,
    and the short ones stay whole within the capacity. Without one, the fixed layout's 65 is
    the cap: only an exactly even placement meets it (one short document each)."""
    lengths = [100, 10, 10, 10]
    assert split_local_tokens(lengths, 1, 2) == 65
    p = place_documents(lengths, threshold=100, ring=1, ulysses=2, capacity=80)
    share = split_local_tokens([lengths[d] for d in p.split], 1, 2)
    held = [share + sum(lengths[d] for d in p.local(r)) for r in range(2)]
    assert max(held) <= 80 and p.split == [0] and held == [70, 60]
    assert place_documents(lengths, threshold=100, ring=1, ulysses=2).split == [0, 3]
    # The formula is SPLayout's (ring pads each document to 2R, ulysses the whole to U).
    for ring, ulysses in ((1, 4), (4, 1), (2, 2), (3, 2)):
        cu = torch.tensor([0, 100, 110, 120, 130])
        assert (
            split_local_tokens(lengths, ring, ulysses)
            == SPLayout(cu, 130, ring, ulysses).local_tokens
        )


def test_a_batch_over_capacity_is_one_line():
    with pytest.raises(ValueError, match="needs 50 tokens per rank .* above the capacity of 40"):
        place_documents([100], threshold=0, ring=1, ulysses=2, capacity=40)


def _shard(cu, T, dims, threshold, sp_rank=None, ring_impl=None):
    """This rank's adaptive shard, a rank allowed twice the fixed layout's tokens."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    capacity = 2 * split_local_tokens(lengths, dims.ring, dims.ulysses)
    placement = place_documents(lengths, threshold, dims.ring, dims.ulysses, capacity)
    rank = dims.sp_rank if sp_rank is None else sp_rank
    return shard_packed_adaptive(cu, T, placement, dims.ring, dims.ulysses, rank, ring_impl)


def test_every_token_is_on_exactly_one_rank():
    cu = torch.tensor([0, *torch.tensor(DOC_LENGTHS).cumsum(0).tolist()])
    T = sum(DOC_LENGTHS)
    dims = ParallelDims(4, ulysses=2, ring=2)
    for threshold in (0, 13, 17, 100):
        seen = torch.cat([_shard(cu, T, dims, threshold, r).local_index_T for r in range(4)])
        assert sorted(seen[seen >= 0].tolist()) == list(range(T)), threshold


ATTN_CASES = {  # world size -> [(name, config, threshold)]
    2: [("ulysses2-mixed", Config("ulysses", ulysses=2), 17),
        ("ring2-allgather-mixed", Config("ring", ring=2, ring_impl="allgather"), 13)],
    4: [("usp2x2-mixed", Config("usp", ulysses=2, ring=2), 17),
        ("ring4-all-local", Config("ring", ring=4), 100),
        ("dp2-ring2-mixed", Config("ring", ring=2), 13)],
}  # fmt: skip


def _attn_worker(rank: int, world_size: int) -> dict:
    """adaptive_attn_varlen_func on this rank's tokens against one process, per case."""
    results = {}
    for name, cfg, threshold in ATTN_CASES[world_size]:
        dp = 2 if name.startswith("dp2") else None
        dims = ParallelDims(world_size, ulysses=cfg.ulysses, ring=cfg.ring, dp=dp)
        dims.build_mesh("cpu")
        for hq, hkv in ((4, 2), (4, 1)):
            for causal in (True, False):
                cu, q, k, v, dout = make_batch(hq, hkv)
                ref = reference(cu, q, k, v, dout, causal)
                layout = _shard(cu, q.shape[0], dims, threshold)
                idx = layout.local_index_T
                real = idx >= 0
                x = [layout.take(t, 0.0).requires_grad_() for t in (q, k, v)]
                out = adaptive_attn_varlen_func(
                    dims.ulysses_group, dims.ring_group, *x, layout.attn_meta, causal=causal,
                    backend="torch", ring_impl=cfg.ring_impl,
                )  # fmt: skip
                (out * layout.take(dout, 0.0)).sum().backward()
                errs = {"out": rel_err(out[real], ref["out"][idx[real]])}
                for key, t in zip(("dq", "dk", "dv"), x):
                    errs[key] = rel_err(t.grad[real], ref[key][idx[real]])
                results[f"{name}-Hq{hq}-Hkv{hkv}-{'causal' if causal else 'full'}"] = errs
        dist.barrier()
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_adaptive_attention_equals_one_process(world_size):
    for rank, results in enumerate(spawn(_attn_worker, world_size, timeout=300)):
        assert len(results) == len(ATTN_CASES[world_size]) * 4
        for case, errs in results.items():
            assert max(errs.values()) < RTOL, (rank, case, errs)


CASES = {  # name -> (config, threshold)
    "usp2x2-mixed": (Config("usp", ulysses=2, ring=2), 17),  # 13, 1, 17 local; 30 split
    "ulysses4-all-local": (Config("ulysses", ulysses=4), 100),
    "ring4-all-split": (Config("ring", ring=4), 0),
    "ring4-mixed": (Config("ring", ring=4), 13),
    "ulysses4-mixed": (Config("ulysses", ulysses=4), 17),
    # parallel=auto: a ring grid whose split documents run over its Ulysses view this time.
    "auto-ulysses-view": (Config("auto", ring=4), 17),
}


def _degrees(split_meta) -> tuple[int, int] | None:
    """(ulysses, ring) of the split documents' layout; None when nothing was split."""
    return None if split_meta is None else (split_meta.layout.ulysses, split_meta.layout.ring)


def _worker(rank: int, world_size: int, names: list[str]) -> dict:
    cu, tokens, position_ids, labels, weights = _batch()
    base = build_model(_model_cfg(), seed=3)
    longest = max(DOC_LENGTHS)
    ref_loss, ref_grads = _loss_and_grads(
        copy.deepcopy(base), tokens, position_ids, VarlenMeta(cu, cu, longest, longest),
        labels, weights,
    )  # fmt: skip
    results = {}
    for name in names:
        cfg, threshold = CASES[name]
        dims = ParallelDims(world_size, ulysses=cfg.ulysses, ring=cfg.ring)
        dims.validate(4, 2, seq_len=None)
        dims.build_mesh("cpu")
        split_dims = dims
        if cfg.method == "auto":
            dims.alternate = split_dims = ParallelDims(world_size, ulysses=cfg.ring)
            split_dims.build_mesh("cpu")
        model = parallel.apply(copy.deepcopy(base), dims, cfg)
        layout = _shard(cu, len(tokens), split_dims, threshold, ring_impl=cfg.ring_impl)
        loss, grads = _loss_and_grads(
            model, layout.take(tokens, 0), layout.take(position_ids, 0), layout.attn_meta,
            layout.take(labels, -100), layout.take(weights, 0.0),
        )  # fmt: skip
        dist.all_reduce(loss, group=dims.sp_group)
        for g in grads.values():
            dist.all_reduce(g, group=dims.sp_group)
        results[name] = {
            "loss": float(abs(loss - ref_loss) / abs(ref_loss)),
            "grads": max(
                float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max())
                for n in grads
            ),
            "local_tokens": layout.attn_meta.num_local,
            "split_layout": _degrees(layout.attn_meta.split_meta),
        }
    return results


@pytest.mark.distributed
def test_adaptive_model_loss_and_grads_equal_one_process():
    names = list(CASES)
    per_rank = spawn(_worker, 4, names, timeout=300)
    for rank, results in enumerate(per_rank):
        for name, r in results.items():
            assert r["loss"] < RTOL and r["grads"] < RTOL, (rank, name, r)
    local = {name: sum(r[name]["local_tokens"] for r in per_rank) for name in names}
    assert local["ulysses4-all-local"] == sum(DOC_LENGTHS)  # within twice the fixed layout
    assert local["ring4-all-split"] == 0
    assert 0 < local["usp2x2-mixed"] < sum(DOC_LENGTHS)
    assert per_rank[0]["auto-ulysses-view"]["split_layout"] == (4, 1)  # (ulysses, ring)
