"""The loader: a pure function of (seed, step), sharded over data-parallel ranks."""

import numpy as np
import pytest

from longtrain.data.loader import PackedLoader
from longtrain.data.packing import best_fit

LENGTHS = np.random.default_rng(3).integers(1, 50, size=200)
TOKENS = np.arange(int(LENGTHS.sum())) % 250
OFFSETS = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
PACKING = best_fit(LENGTHS, seq_len=64)


def loader(dp_rank=0, dp_size=1, micro_batch=0, seed=7, global_batch=8):
    return PackedLoader(TOKENS, OFFSETS, PACKING, global_batch, micro_batch, dp_rank, dp_size,
                        seed=seed, shuffle=True, pad_id=255)  # fmt: skip


def test_ranks_split_the_global_batch_without_overlap():
    one = loader().batches_for_step(5).micro_batches[0]
    parts = [loader(r, 4).batches_for_step(5).micro_batches[0] for r in range(4)]
    assert sum(p.num_sequences for p in parts) == one.num_sequences == 8
    assert np.concatenate([p.tokens.numpy() for p in parts]).tolist() == one.tokens.tolist()


def test_micro_batches_split_the_rank_batch():
    whole = loader().batches_for_step(2).micro_batches
    split = loader(micro_batch=2).batches_for_step(2).micro_batches
    assert len(whole) == 1 and len(split) == 4
    assert np.concatenate([m.labels.numpy() for m in split]).tolist() == whole[0].labels.tolist()


def test_epochs_visit_every_sequence_once_and_reshuffle():
    ld = loader(global_batch=1)
    n = PACKING.num_sequences
    first = [int(ld.global_sequence_ids(s)[0]) for s in range(n)]
    second = [int(ld.global_sequence_ids(s)[0]) for s in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second


def test_resume_from_state_dict_gives_the_same_stream():
    a = loader()
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    expected = next(it).micro_batches[0].tokens
    b = loader()
    b.load_state_dict(state)
    assert next(iter(b)).micro_batches[0].tokens.tolist() == expected.tolist()


def test_bad_batch_sizes_name_the_numbers():
    with pytest.raises(ValueError, match=r"global_batch \(6\) must be divisible .* \(4\)"):
        loader(dp_size=4, global_batch=6)
    with pytest.raises(ValueError, match=r"micro_batch \(3\) must divide the per-rank batch"):
        loader(micro_batch=3)
    with pytest.raises(ValueError, match="differs from train.seed"):
        loader().load_state_dict({"next_step": 1, "seed": 8})
