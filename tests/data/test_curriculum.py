"""Tests of longtrain.data.curriculum: odds, batch sizes, the seeded schedule (quotas, constant
tokens per step, determinism, growth, the sequential-draw law), stages, and errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longtrain.data.curriculum import (
    LengthStages,
    Stage,
    bucket_batch_sizes,
    curriculum_odds,
    variable_length_schedule,
)

COUNTS = {8: 6400, 9: 3200, 10: 1600, 11: 800, 12: 400, 13: 200}  # 400 batches each at 2^13


def test_odds_exact() -> None:
    assert curriculum_odds("uniform", 4).tolist() == [1, 1, 1, 1]
    assert curriculum_odds("grow_linear", 4).tolist() == [4, 3, 2, 1]
    assert curriculum_odds("grow_p2", 4).tolist() == [8, 4, 2, 1]
    assert curriculum_odds([0, 2.5, 1], 3).tolist() == [0, 2.5, 1]


def test_batch_sizes_exact() -> None:
    assert bucket_batch_sizes([13, 8, 10], 65536) == {8: 256, 10: 64, 13: 8}


def test_schedule_exact_quotas_and_constant_tokens() -> None:
    tps = 8192
    sched = variable_length_schedule(COUNTS, tps, "grow_p2", cycles=1, seed=3)
    assert all(b << i == tps for i, b in sched)  # tokens per step constant
    # Bucket i holds floor(count / batch) full batches, all scheduled: 6400 // 32 = 200, ...
    assert Counter(i for i, _ in sched) == {i: 200 for i in COUNTS}
    # Leftover chunks are not scheduled: 201 chunks of 2^13 still make 201 batches of 1,
    # but 6431 chunks of 2^8 make 200 batches of 32.
    sched = variable_length_schedule({8: 6431, 13: 201}, tps, seed=0)
    assert Counter(i for i, _ in sched) == {8: 200, 13: 201}


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.integers(0, 6), st.integers(0, 300), min_size=1, max_size=5),
    st.sampled_from(["uniform", "grow_linear", "grow_p2"]),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_schedule_properties(counts, curriculum, cycles, seed) -> None:
    tps = 64
    batch = {i: tps >> i for i in counts}
    quota = {i: c // batch[i] for i, c in counts.items()}
    if sum(quota.values()) == 0:
        with pytest.raises(ValueError, match="holds a full batch"):
            variable_length_schedule(counts, tps, curriculum, cycles, seed)
        return
    sched = variable_length_schedule(counts, tps, curriculum, cycles, seed)
    assert all(b == batch[i] and b << i == tps for i, b in sched)
    assert Counter(i for i, _ in sched) == {i: q for i, q in quota.items() if q}
    assert sched == variable_length_schedule(counts, tps, curriculum, cycles, seed)
    # Cycle c is a block of steps that holds exactly its share of every bucket.
    pos = 0
    for c in range(cycles):
        share = {i: q // cycles + (c < q % cycles) for i, q in quota.items()}
        n = sum(share.values())
        assert Counter(i for i, _ in sched[pos : pos + n]) == {i: q for i, q in share.items() if q}
        pos += n


def test_seed_changes_the_order_only() -> None:
    a = variable_length_schedule(COUNTS, 8192, "uniform", seed=0)
    b = variable_length_schedule(COUNTS, 8192, "uniform", seed=1)
    assert a != b and sorted(a) == sorted(b)


def _mean_len(steps: list[tuple[int, int]]) -> float:
    return float(np.mean([1 << i for i, _ in steps]))


def test_grow_curricula_lengthen_sequences_within_each_cycle() -> None:
    # Deterministic (fixed seed): with grow_p2 the short buckets are spent first, so the last
    # quarter of each cycle reads much longer sequences than the first; uniform does not.
    for cycles in (1, 2):
        sched = variable_length_schedule(COUNTS, 8192, "grow_p2", cycles=cycles, seed=0)
        n = len(sched) // cycles
        for c in range(cycles):
            cyc = sched[c * n : (c + 1) * n]
            assert _mean_len(cyc[-n // 4 :]) > 4 * _mean_len(cyc[: n // 4])
    uni = variable_length_schedule(COUNTS, 8192, "uniform", seed=0)
    q = len(uni) // 4
    assert _mean_len(uni[-q:]) < 1.5 * _mean_len(uni[:q])
    lin = variable_length_schedule(COUNTS, 8192, "grow_linear", seed=0)
    assert _mean_len(lin[-q:]) > 2 * _mean_len(lin[:q])


def test_first_draw_follows_odds_times_quota() -> None:
    # The first step picks bucket i with probability odds_i * q_i / sum: with odds 3 : 1 and
    # quotas 1 : 1 (2 chunks of 1 token, 1 chunk of 2, 2 tokens per step) that is 0.75.
    # Over 4000 seeds the binomial std is 0.0068; 0.03 is 4.4 std.
    first = [
        variable_length_schedule({0: 2, 1: 1}, 2, [3.0, 1.0], seed=s)[0][0] for s in range(4000)
    ]
    assert abs(first.count(0) / 4000 - 0.75) < 0.03
    # Quotas 3 : 1 with uniform odds: bucket 0 first with probability 0.75 as well.
    first = [variable_length_schedule({0: 6, 1: 1}, 2, seed=s)[0][0] for s in range(4000)]
    assert abs(first.count(0) / 4000 - 0.75) < 0.03


def test_zero_odds_bucket_is_never_drawn() -> None:
    sched = variable_length_schedule({0: 10, 1: 10, 2: 10}, 4, [1, 0, 1], seed=0)
    assert Counter(i for i, _ in sched) == {0: 2, 2: 10}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bucket_counts={}), "bucket set is empty"),
        (dict(tokens_per_step=4096), r"not divisible by 2\^13=8192 \(bucket 13\)"),
        (dict(tokens_per_step=0), "tokens_per_step must be an integer >= 1"),
        (dict(curriculum=[0, 0, 0, 0, 0, 0]), "all zero"),
        (dict(curriculum=[1, -1, 1, 1, 1, 1]), "finite and >= 0"),
        (dict(curriculum=[1, 1]), "one entry per bucket"),
        (dict(curriculum="grow_cubic"), "is not one of"),
        (dict(cycles=0), "cycles must be an integer >= 1"),
        (dict(bucket_counts={8: 31}), "holds a full batch"),
        (dict(bucket_counts={8: -1, 9: 5}), "counts must be >= 0"),
        (dict(bucket_counts={8: 64, 9: 15}, curriculum=[0, 1]), "holds a full batch"),
    ],
)
def test_schedule_errors(kwargs, match: str) -> None:
    args = dict(bucket_counts=COUNTS, tokens_per_step=8192, curriculum="uniform", cycles=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        variable_length_schedule(**args)


def test_length_stages() -> None:
    stages = LengthStages([(100, 8192, 5e5), Stage(50, 32768, 4e6), (10, 131072, 1.6e7)])
    assert stages.total_steps == 160
    assert [stages.index_at(s) for s in (0, 99, 100, 149, 150, 159, 160, 10**6)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        2,
        2,
    ]
    assert stages.stage_at(120) == Stage(50, 32768, 4e6)
    with pytest.raises(ValueError, match="step must be >= 0"):
        stages.stage_at(-1)
    with pytest.raises(ValueError, match="at least one stage"):
        LengthStages([])
    with pytest.raises(ValueError, match="Stage.steps must be an integer >= 1"):
        Stage(0, 8192, 1e4)
    with pytest.raises(ValueError, match="Stage.seq_len must be an integer >= 1"):
        Stage(5, 0, 1e4)
    with pytest.raises(ValueError, match="rope_theta must be > 0"):
        Stage(5, 8192, 0.0)
