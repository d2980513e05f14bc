"""The loader and its schedules: pure functions of (seed, step), sharded over data-parallel
ranks with balanced attention cost, resumable, prefetching."""

import numpy as np
import pytest

from longtrain.data.balance import balanced_assignment, imbalance, sequence_costs
from longtrain.data.curriculum import Stage
from longtrain.data.decomposition import decompose
from longtrain.data.loader import PackedLoader
from longtrain.data.packing import best_fit
from longtrain.data.schedule import (
    DecompositionSchedule,
    FixedLengthSchedule,
    StagedSchedule,
    StageSpec,
)

LENGTHS = np.random.default_rng(3).integers(1, 50, size=200)
TOKENS = np.arange(int(LENGTHS.sum())) % 250
OFFSETS = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
PACKING = best_fit(LENGTHS, seq_len=64)


def loader(dp_rank=0, dp_size=1, micro_tokens=0, seed=7, global_batch=8, **kw):
    schedule = FixedLengthSchedule(PACKING, global_batch, seed=seed)
    return PackedLoader(TOKENS, OFFSETS, schedule, dp_rank, dp_size, pad_id=255,
                        micro_tokens=micro_tokens, **kw)  # fmt: skip


def tokens_of(step_batches):
    return np.concatenate([m.tokens.numpy() for m in step_batches.micro_batches])


def test_ranks_split_the_global_batch_without_overlap():
    one = loader().batches_for_step(5).micro_batches[0]
    parts = [loader(r, 4, balance=False).batches_for_step(5).micro_batches[0] for r in range(4)]
    assert sum(p.num_sequences for p in parts) == one.num_sequences == 8
    assert np.concatenate([p.tokens.numpy() for p in parts]).tolist() == one.tokens.tolist()
    balanced = [loader(r, 4).batches_for_step(5).micro_batches[0] for r in range(4)]
    # Balancing permutes whole sequences between ranks: the same multiset of sequences.
    rows = lambda bs: sorted(tuple(b.tokens.view(-1, 64)[i].tolist()) for b in bs for i in range(2))  # noqa: E731
    assert rows(balanced) == rows(parts)


def test_micro_batches_split_the_rank_batch():
    whole = loader().batches_for_step(2).micro_batches
    split = loader(micro_tokens=2 * 64).batches_for_step(2).micro_batches
    assert len(whole) == 1 and len(split) == 4
    assert np.concatenate([m.labels.numpy() for m in split]).tolist() == whole[0].labels.tolist()


def test_epochs_visit_every_sequence_once_and_reshuffle():
    sched = FixedLengthSchedule(PACKING, 1, seed=7)
    n = PACKING.num_sequences
    first = [int(sched.plan(s).seq_ids[0]) for s in range(n)]
    second = [int(sched.plan(s).seq_ids[0]) for s in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_state_dict_gives_the_same_stream(prefetch):
    a = loader(prefetch=prefetch)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    expected = [tokens_of(next(it)).tolist() for _ in range(3)]
    a.close()
    b = loader(prefetch=prefetch)
    b.load_state_dict(state)
    it_b = iter(b)
    assert [tokens_of(next(it_b)).tolist() for _ in range(3)] == expected
    b.close()


def test_bad_batch_sizes_name_the_numbers():
    with pytest.raises(ValueError, match=r"8 sequences of 64 tokens, not divisible .* size 3"):
        loader(dp_size=3)
    with pytest.raises(ValueError, match=r"micro-batch of 3 sequences"):
        loader(micro_tokens=3 * 64)
    with pytest.raises(ValueError, match="differs from train.seed"):
        loader().load_state_dict({"next_step": 1, "seed": 8})


def test_balanced_assignment_is_within_five_percent_when_possible():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(6, 1.5, size=20000).astype(np.int64) + 1, 50000)
    packing = best_fit(lengths, seq_len=8192)
    ids = rng.permutation(packing.num_sequences)[:64]
    costs = sequence_costs(packing, ids)
    groups = balanced_assignment(costs, 8)
    assert sorted(np.concatenate(groups).tolist()) == list(range(64))
    assert all(len(g) == 8 for g in groups)
    naive = [np.arange(r * 8, (r + 1) * 8) for r in range(8)]
    assert imbalance(costs, groups) <= 1.05 < imbalance(costs, naive)


def test_decomposition_schedule_keeps_tokens_per_step_and_covers_chunks_once():
    dec = decompose(LENGTHS, min_log2=2, max_log2=5)
    sched = DecompositionSchedule(dec, tokens_per_step=128, curriculum="grow_linear", cycles=2,
                                  seed=1)  # fmt: skip
    seen = set()
    for step in range(sched.steps_per_epoch):
        plan = sched.plan(step)
        assert len(plan.seq_ids) * plan.seq_len == 128
        for s in plan.seq_ids.tolist():
            assert (plan.seq_len, s) not in seen
            seen.add((plan.seq_len, s))
    again = sched.plan(sched.steps_per_epoch)  # next epoch: same bucket order, new chunk order
    assert again.seq_len == sched.plan(0).seq_len


def test_stages_switch_seq_len_and_rope_theta_at_boundaries():
    specs = [StageSpec(Stage(3, 32, 1e4), 4), StageSpec(Stage(2, 64, 5e5), 2)]
    sched = StagedSchedule(specs, LENGTHS, best_fit, seed=0)
    plans = [sched.plan(s) for s in range(7)]
    assert [p.seq_len for p in plans] == [32, 32, 32, 64, 64, 64, 64]
    assert [p.rope_theta for p in plans] == [1e4] * 3 + [5e5] * 4
    assert [len(p.seq_ids) for p in plans] == [4, 4, 4, 2, 2, 2, 2]
    assert [p.stage for p in plans] == [0, 0, 0, 1, 1, 1, 1]
