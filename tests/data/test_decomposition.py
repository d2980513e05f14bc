"""Tests of longtrain.data.decomposition: exact buckets, the binary split rule against a
per-document oracle, coverage, the Packing view, bad input and lognormal lengths (its speed
is measured by bench/packing.py, not asserted here)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.packing import synthetic_lengths
from longtrain.data.decomposition import decompose

I64 = np.int64


def split_one(length: int, lo: int, hi: int) -> tuple[list[tuple[int, int]], int]:
    """The rule for one document, by hand: ([(start, log2 size)], dropped tokens)."""
    chunks, pos = [], 0
    while length - pos >= 1 << hi:
        chunks.append((pos, hi))
        pos += 1 << hi
    for i in range(hi - 1, lo - 1, -1):
        if length - pos >= 1 << i:
            chunks.append((pos, i))
            pos += 1 << i
    return chunks, length - pos


def as_lists(d) -> dict[int, list[tuple[int, int]]]:
    return {i: list(zip(ids.tolist(), st_.tolist())) for i, (ids, st_) in d.buckets.items()}


def test_exact_example() -> None:
    # 45 = 2 * 16 + 8 + 4 + 1 with buckets 2^2..2^4: the 1 is dropped.
    d = decompose([45], 2, 4)
    assert as_lists(d) == {2: [(0, 40)], 3: [(0, 32)], 4: [(0, 0), (0, 16)]}
    assert d.dropped_tokens == 1
    assert d.tokens_per_bucket() == {2: 4, 3: 8, 4: 32}
    assert d.num_tokens == 44


def test_exact_several_documents() -> None:
    # min_log2 0 keeps every token: 1 -> [1]; 7 -> [4, 2, 1]; 16 -> [4] x 4; 0 -> nothing.
    d = decompose([0, 1, 7, 16], 0, 2)
    assert as_lists(d) == {
        0: [(1, 0), (2, 6)],
        1: [(2, 4)],
        2: [(2, 0), (3, 0), (3, 4), (3, 8), (3, 12)],
    }
    assert d.dropped_tokens == 0
    assert d.chunks_per_bucket() == {0: 2, 1: 1, 2: 5}


def test_single_bucket_and_empty() -> None:
    d = decompose([5, 8, 3], 2, 2)  # only 4-token chunks
    assert as_lists(d) == {2: [(0, 0), (1, 0), (1, 4)]}
    assert d.dropped_tokens == 1 + 0 + 3
    d = decompose([], 3, 5)
    assert list(d.buckets) == [3, 4, 5] and d.num_tokens == 0 and d.dropped_tokens == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 300), max_size=30),
    st.integers(0, 6),
    st.integers(0, 4),
)
def test_matches_rule_and_covers_every_token_once(lens: list[int], lo: int, span: int) -> None:
    hi = lo + span
    d = decompose(lens, lo, hi)
    assert sorted(d.buckets) == list(range(lo, hi + 1))
    # Exactly the hand-written rule, document by document.
    got: dict[int, list[tuple[int, int]]] = {k: [] for k in range(len(lens))}
    for i, (ids, starts) in d.buckets.items():
        assert ids.dtype == I64 and starts.dtype == I64
        order = np.lexsort((starts, ids))
        assert np.array_equal(order, np.arange(ids.size))  # ordered by doc, then start
        for doc, start in zip(ids.tolist(), starts.tolist()):
            got[doc].append((start, i))
    dropped = 0
    for doc, length in enumerate(lens):
        want, drop = split_one(length, lo, hi)
        assert sorted(got[doc]) == want
        dropped += drop
        assert drop < 1 << lo
    assert d.dropped_tokens == dropped
    assert d.num_tokens + d.dropped_tokens == sum(lens)
    # Each bucket as a Packing: sequences of exactly 2^i tokens, no token held twice.
    for i in d.buckets:
        p = d.as_packing(i)
        p.validate(lens, complete=False)
        assert p.seq_len == 1 << i
        assert p.num_sequences == d.chunks_per_bucket()[i]
        assert np.all(p.seq_lengths() == 1 << i)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2000), min_size=1, max_size=30), st.integers(0, 3))
def test_chunks_of_a_document_are_distinct_powers_of_two_largest_first(lens, lo) -> None:
    hi = lo + 5
    d = decompose(lens, lo, hi)
    per_doc: dict[int, list[tuple[int, int]]] = {}
    for i, (ids, starts) in d.buckets.items():
        for doc, start in zip(ids.tolist(), starts.tolist()):
            per_doc.setdefault(doc, []).append((start, i))
    for doc, chunks in per_doc.items():
        sizes = [i for _, i in sorted(chunks)]
        assert sizes == sorted(sizes, reverse=True)  # the document's start is in the largest
        below_max = [i for i in sizes if i < hi]
        assert len(below_max) == len(set(below_max))  # distinct powers below 2^max_log2
        assert sizes.count(hi) == lens[doc] >> hi


def test_as_packing_view_fails_complete_validation() -> None:
    # A bucket is a partial view: the complete check must notice the other buckets' tokens.
    lens = [7]
    p = decompose(lens, 0, 2).as_packing(2)
    with pytest.raises(ValueError, match="4 of 7 tokens held"):
        p.validate(lens)
    p.validate(lens, complete=False)


@pytest.mark.parametrize(
    "lo, hi, match",
    [
        (5, 4, "min_log2=5 must be <= max_log2=4"),
        (-1, 4, "min_log2 must lie in"),
        (0, 63, "max_log2 must lie in"),
        (1.0, 4, "min_log2 must be an integer"),
        (True, 4, "min_log2 must be an integer"),
    ],
)
def test_bad_log2(lo, hi, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decompose([1, 2], lo, hi)


def test_bad_lengths_and_bucket() -> None:
    with pytest.raises(ValueError, match="is negative"):
        decompose([4, -2], 0, 3)
    with pytest.raises(ValueError, match="must be integers"):
        decompose([4.0], 0, 3)
    with pytest.raises(ValueError, match="bucket 9 is outside"):
        decompose([4], 0, 3).as_packing(9)


def test_lognormal_lengths() -> None:
    lens = synthetic_lengths(200_000, seed=2)
    d = decompose(lens, 8, 13)
    assert d.num_tokens + d.dropped_tokens == int(lens.sum())
    # Dropped tokens: at most 255 per document (the bits below 2^8), exactly these bits.
    assert d.dropped_tokens == int((lens & 255).sum())
    # Chunks of 8192 tokens: exactly floor(l / 8192) per document.
    assert d.chunks_per_bucket()[13] == int((lens >> 13).sum())
