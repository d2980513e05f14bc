"""Flat packed batches: document masking, labels that never cross a document, padding."""

import numpy as np
import pytest
import torch

from longtrain.data.batch import IGNORE_INDEX, build_batch
from longtrain.data.packing import Packing, best_fit, concat_chunk

PAD = 99


def _store(lengths):
    """Token ids that encode (document, position) so every check is exact: doc*100 + pos."""
    tokens = np.concatenate([d * 100 + np.arange(n) for d, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return tokens, offsets


def test_concat_chunk_batch_labels_continue_into_the_same_document_only():
    lengths = [5, 3, 9]
    tokens, offsets = _store(lengths)
    packing = concat_chunk(np.array(lengths), seq_len=8)
    batch = build_batch(tokens, offsets, packing, np.arange(packing.num_sequences), PAD)
    # seq 0: doc0[0:5] doc1[0:3]; seq 1: doc2[0:8]; seq 2: doc2[8:9] + 7 padding
    assert batch.tokens.tolist()[:8] == [0, 1, 2, 3, 4, 100, 101, 102]
    assert batch.cu_seqlens.tolist() == [0, 5, 8, 16, 17, 24]
    assert batch.segment_is_padding.tolist() == [False, False, False, False, True]
    # The last token of doc 0 has no label (next doc); doc 2's cut at 8 keeps its label (208).
    assert batch.labels.tolist()[:17] == [
        1, 2, 3, 4, IGNORE_INDEX, 101, 102, IGNORE_INDEX,
        201, 202, 203, 204, 205, 206, 207, 208,
        IGNORE_INDEX,
    ]  # fmt: skip
    assert batch.position_ids.tolist()[:17] == [0, 1, 2, 3, 4, 0, 1, 2, *range(8), 0]
    assert (batch.labels[17:] == IGNORE_INDEX).all() and (batch.tokens[17:] == PAD).all()
    assert batch.num_padding == 7 and batch.num_docs == 4 and batch.num_sequences == 3
    assert torch.equal(batch.loss_weights, (batch.labels != IGNORE_INDEX).double())


def test_best_fit_batch_covers_every_trained_pair_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=30)
    tokens, offsets = _store(lengths)
    packing = best_fit(lengths, seq_len=32)
    batch = build_batch(tokens, offsets, packing, np.arange(packing.num_sequences), PAD)
    pairs = {(int(t), int(l)) for t, l in zip(batch.tokens, batch.labels) if l != IGNORE_INDEX}
    # Every (token, next token) pair inside a document is trained exactly once.
    expected = {(d * 100 + i, d * 100 + i + 1) for d, n in enumerate(lengths) for i in range(n - 1)}
    assert pairs == expected
    assert batch.num_trained() == len(expected)
    seg = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    assert sum(seg) == batch.num_tokens == packing.num_sequences * 32


def test_overfull_sequence_is_refused():
    bad = Packing(
        doc_ids=np.array([0, 1]), starts=np.array([0, 0]), lengths=np.array([5, 5]),
        seq_offsets=np.array([0, 2]), seq_len=8,
    )  # fmt: skip
    tokens, offsets = _store([5, 5])
    with pytest.raises(ValueError, match="more than seq_len=8"):
        build_batch(tokens, offsets, bad, np.array([0]), PAD)


def test_per_document_weights_make_every_document_weigh_one():
    lengths = [5, 3, 9]
    tokens, offsets = _store(lengths)
    packing = concat_chunk(np.array(lengths), seq_len=8)
    batch = build_batch(tokens, offsets, packing, np.arange(3), PAD, "per_document")
    w = batch.loss_weights.numpy()
    # Segments: doc0 (4 trained), doc1 (2), doc2[0:8] (8: its cut keeps the last label), doc2[8:9]
    # (0 trained: the document ends), padding. Each trained segment sums to exactly 1.
    cu = batch.cu_seqlens.tolist()
    sums = [w[a:b].sum() for a, b in zip(cu[:-1], cu[1:])]
    assert sums == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert w[0] == 0.25 and w[5] == 0.5 and w[8] == 0.125
    with pytest.raises(ValueError, match="loss weighting 'per_token'"):
        build_batch(tokens, offsets, packing, np.arange(3), PAD, "per_token")
