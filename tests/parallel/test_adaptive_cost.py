"""The adaptive placement's cost model and choice (parallel/adaptive_cost.py): the predicted
time of a placement by hand, and what the choice does when the link is slow, the latency
high or a document too long to keep whole. Pure functions: no processes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel import AdaptivePolicy, AttnShape, Placement, SPCostModel, SplitMethod
from parallel.adaptive_cost import candidate_thresholds, method_key, placement_cost

SHAPE = AttnShape(n_heads=4, n_kv_heads=2, head_dim=8, dtype=torch.float32)
RING4 = SplitMethod("ring", 4, 1, "zigzag")
ULYSSES4 = SplitMethod("ulysses", 1, 4)
ALLGATHER4 = SplitMethod("ring_allgather", 4, 1, "allgather")


def _model(bytes_per_s: float = 1e9, latency_s: float = 0.0) -> SPCostModel:
    return SPCostModel(pair_s=1e-9, token_s=1e-7, bytes_per_s=bytes_per_s, latency_s=latency_s)


def test_predicted_time_by_hand():
    # Two local documents of 4 tokens on ranks 0 and 1, one of 8 split over 2 Ulysses ranks.
    lengths, placement = [4, 4, 8], Placement((0, 1, -1), 2)
    cost = placement_cost(lengths, placement, 1, 2, "zigzag", SHAPE, _model(1e9, 1e-6))
    # Each rank: 10 + 36 / 2 = 28 causal pairs, 4 + 4 tokens.
    compute = 28 * 1e-9 + 8 * 1e-7
    # Ulysses over 2 (parallel.usp_cost): per all-to-all (U-1) x 4 tokens x 8 x 4 B = 128 B a
    # head; forward q, k, v, out = (2 + 1 + 1) + 2 heads, backward the same; 2 + 2 calls.
    comm_bytes = 2 * 128 * (2 + 2 * 1 + 2)
    assert cost.comm_bytes == comm_bytes
    assert cost.seconds == pytest.approx(compute + comm_bytes / 1e9 + 4 * 1e-6, rel=1e-12)
    assert (cost.local_tokens, cost.split_tokens) == (8, 8)


def test_a_methods_measured_overhead_is_charged_per_split_token_on_every_rank():
    lengths, placement = [4, 4, 8], Placement((0, 1, -1), 2)
    base = placement_cost(lengths, placement, 1, 2, "zigzag", SHAPE, _model(1e9, 1e-6))
    key = method_key(1, 2, "zigzag")
    slow = dataclasses.replace(_model(1e9, 1e-6), split_overheads=((key, 1e-3),))
    cost = placement_cost(lengths, placement, 1, 2, "zigzag", SHAPE, slow)
    # Each rank holds 4 tokens of the split document: 4 ms more, the rest as before.
    assert cost.seconds == pytest.approx(base.seconds + 4 * 1e-3, rel=1e-12)
    # Another layout's overhead leaves this one alone; a placement with nothing split too.
    other = dataclasses.replace(slow, split_overheads=((method_key(2, 1, "zigzag"), 1e-3),))
    assert placement_cost(lengths, placement, 1, 2, "zigzag", SHAPE, other) == base
    whole = Placement((0, 1, 0), 2)
    assert placement_cost(lengths, whole, 1, 2, "zigzag", SHAPE, slow) == placement_cost(
        lengths, whole, 1, 2, "zigzag", SHAPE, _model(1e9, 1e-6)
    )


def test_measured_overheads_pick_the_faster_split_method_and_keep_documents_whole():
    # A free link: the three methods cost the same but for their overheads.
    overheads = {RING4: 3e-6, ULYSSES4: 2e-6, ALLGATHER4: 0.5e-6}
    measured = dataclasses.replace(_model(1e30), split_overheads=tuple(
        (method_key(m.ring, m.ulysses, m.ring_impl), s) for m, s in overheads.items()))  # fmt: skip
    policy = AdaptivePolicy([RING4, ULYSSES4, ALLGATHER4], SHAPE, measured)
    assert policy.choose([4096]).method == ALLGATHER4
    # Balanced short documents: free to split, but no overhead kept whole.
    assert policy.choose([512] * 8).cost.split_tokens == 0
    assert AdaptivePolicy([RING4], SHAPE, _model(1e30)).choose([512] * 8).cost.split_tokens > 0
    assert [method_key(m.ring, m.ulysses, m.ring_impl) for m in overheads] == [
        "ring4:zigzag", "ulysses4", "ring4:allgather"]  # fmt: skip
    assert method_key(2, 2, "allgather") == "ring2:allgather x ulysses2"


def test_a_slow_link_keeps_short_documents_whole():
    lengths = [512] * 8  # perfectly balanced over 4 ranks
    choice = AdaptivePolicy([RING4], SHAPE, _model(bytes_per_s=1e6)).choose(lengths)
    assert choice.cost.split_tokens == 0 and choice.cost.comm_bytes == 0
    assert all(len(choice.placement.local(r)) == 2 for r in range(4))


def test_a_document_longer_than_a_rank_holds_is_split():
    lengths = [4000, 32, 32, 32]  # 4000 tokens on one rank would be over 1.25 x 1024
    choice = AdaptivePolicy([RING4], SHAPE, _model(bytes_per_s=1e6)).choose(lengths)
    assert choice.placement.split == [0] and choice.cost.local_tokens == 96


def test_never_predicted_slower_than_the_planned_method_and_ties_go_to_it():
    policy = AdaptivePolicy([RING4, ULYSSES4, ALLGATHER4], SHAPE, _model())
    lengths = [3000, 700, 200, 90, 60, 30, 16]
    fixed = placement_cost(lengths, Placement((-1,) * 7, 4), 4, 1, "zigzag", SHAPE, _model())
    assert policy.choose(lengths).cost.seconds <= fixed.seconds
    # One long document and a free link: nothing to gain, the planned ring layout stays.
    free = AdaptivePolicy([RING4, ALLGATHER4], SHAPE, _model(1e30))
    assert free.choose([4096]).method == RING4


def test_latency_and_bandwidth_pick_the_split_method():
    lengths = [4096]  # must be split (capacity)
    high_latency = AdaptivePolicy([RING4, ULYSSES4, ALLGATHER4], SHAPE, _model(1e30, 1.0))
    # One all-gather (+ its reduce-scatter) against ring's 2P - 1 exchanges, Ulysses' 4.
    assert high_latency.choose(lengths).method == ALLGATHER4
    slow_link = AdaptivePolicy([RING4, ULYSSES4, ALLGATHER4], SHAPE, _model(1e3, 0.0))
    assert slow_link.choose(lengths).method == ULYSSES4  # the fewest bytes


def test_the_choice_is_remembered_and_candidates_are_few():
    policy = AdaptivePolicy([RING4], SHAPE, _model())
    assert policy.choose([5, 9, 300]) is policy.choose([5, 9, 300])
    assert candidate_thresholds([5, 9, 300]) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert len(candidate_thresholds([1 << 20])) == 22


def test_auto_config_errors_are_one_line():
    from longtrain.config.load import compose_config
    from longtrain.config.rules import validate_run_config
    from longtrain.errors import ConfigError

    cfg = compose_config(["parallel=auto", "parallel.ulysses=2"])
    with pytest.raises(ConfigError, match="parallel=auto takes its ranks from parallel.ring"):
        validate_run_config(cfg, 4)
    cfg = compose_config(["parallel=auto", "parallel.adaptive_threshold=-5"])
    with pytest.raises(ConfigError, match="parallel.adaptive_threshold=-5 must be >= 0"):
        validate_run_config(cfg, 4)


def test_the_run_policy_keeps_the_method_or_chooses_among_three():
    from longtrain.config.load import compose_config
    from longtrain.distributed.parallelize import adaptive_policy
    from parallel import ParallelDims

    cfg = compose_config(["parallel=usp", "parallel.ulysses=2", "parallel.ring=2",
                          "parallel.adaptive=true", "parallel.adaptive_threshold=64"])  # fmt: skip
    policy = adaptive_policy(cfg, ParallelDims(4, ulysses=2, ring=2))
    assert policy.methods == [SplitMethod("usp", 2, 2, "zigzag")] and policy.threshold == 64
    cfg = compose_config(["parallel=auto"])
    ring4 = ParallelDims(4, ring=4)
    assert adaptive_policy(cfg, ring4).methods == [RING4, ALLGATHER4]  # no Ulysses view
    ring4.alternate = ParallelDims(4, ulysses=4)
    assert adaptive_policy(cfg, ring4).methods == [RING4, ULYSSES4, ALLGATHER4]
    assert policy.slack == 0.25 and policy.n_layers == cfg.model.n_layers


def test_auto_over_degrees_that_do_not_divide_the_world_is_one_line():
    from longtrain.config.load import compose_config
    from longtrain.distributed.parallelize import resolve_degrees
    from parallel import ParallelDims

    ulysses, ring = resolve_degrees(compose_config(["parallel=auto", "parallel.ring=3"]), 4)
    with pytest.raises(ValueError, match="world size 4 is not divisible by ulysses x ring = 1 x 3"):
        ParallelDims(4, ulysses=ulysses, ring=ring)
