"""Dataset decomposition (Pouransari et al. 2024, "Dataset Decomposition: Faster LLM Training
with Variable Sequence Length Curriculum").

Every document is split into chunks whose lengths are distinct powers of two, following the
binary representation of its length; bucket i collects every chunk of 2^i tokens. A training
step then draws a whole batch from one bucket (see `longtrain.data.curriculum`), so no sequence
mixes documents and attention cost follows the real document lengths.

Legend: N documents, M = 2^max_log2 (largest chunk), m = 2^min_log2 (smallest chunk).

Split of a document of l tokens (chunk order inside the document: largest first, so the
document's first token goes to the largest chunk):

1. floor(l / M) chunks of M tokens: tokens [0, M), [M, 2M), ...
2. r = l mod M is split by its binary digits, highest first: for each set bit i with
   min_log2 <= i < max_log2, one chunk of 2^i tokens, directly after the previous chunk.
3. The last r mod m tokens (the bits below min_log2) are dropped and counted in
   `Decomposition.dropped_tokens`.

Example: l = 45 with min_log2 = 2, max_log2 = 4 (M = 16): chunks [0, 16) and [16, 32) of 16
tokens; r = 13 = 0b1101 gives [32, 40) (bit 3) and [40, 44) (bit 2); bit 0 is below min_log2,
so token 44 is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longtrain.data.pack_format import Packing, as_doc_lengths, ragged_arange

_I64 = np.int64
_MAX_LOG2 = 62  # 2^62 still fits int64 with room for sums of two chunks


@dataclass(frozen=True)
class Decomposition:
    """Chunks of every document grouped by power-of-two length.

    Attributes:
        buckets: i -> (doc_ids, starts), [k_i] int64 arrays each: chunk j is document
            doc_ids[j], tokens [starts[j], starts[j] + 2^i). Every i in [min_log2, max_log2]
            has an entry (possibly empty); chunks are ordered by document, then start.
        dropped_tokens: tokens that fell below 2^min_log2 (in no chunk).
        min_log2, max_log2: the bucket range.
        num_docs: N, the number of documents decomposed.
    """

    buckets: dict[int, tuple[np.ndarray, np.ndarray]] = field(repr=False)
    dropped_tokens: int
    min_log2: int
    max_log2: int
    num_docs: int

    def tokens_per_bucket(self) -> dict[int, int]:
        """i -> tokens held by bucket i (chunks x 2^i)."""
        return {i: int(d.size) << i for i, (d, _) in self.buckets.items()}

    def chunks_per_bucket(self) -> dict[int, int]:
        """i -> number of chunks of 2^i tokens."""
        return {i: int(d.size) for i, (d, _) in self.buckets.items()}

    @property
    def num_tokens(self) -> int:
        """Tokens held by all buckets (dropped tokens excluded)."""
        return sum(self.tokens_per_bucket().values())

    def as_packing(self, i: int) -> Packing:
        """Bucket i as a `Packing` with seq_len 2^i and one chunk per sequence.

        The view covers only bucket i's chunks: validate it with `complete=False`.

        Args:
            i: bucket, min_log2 <= i <= max_log2.
        Returns:
            Packing whose sequence j is chunk j of the bucket (the arrays are shared, not copied).
        """
        if i not in self.buckets:
            raise ValueError(f"bucket {i} is outside [{self.min_log2}, {self.max_log2}]")
        doc_ids, starts = self.buckets[i]
        k = doc_ids.size
        return Packing(
            doc_ids=doc_ids,
            starts=starts,
            lengths=np.full(k, 1 << i, _I64),
            seq_offsets=np.arange(k + 1, dtype=_I64),
            seq_len=1 << i,
        )


def _check_log2(min_log2: Any, max_log2: Any) -> tuple[int, int]:
    for name, v in (("min_log2", min_log2), ("max_log2", max_log2)):
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {v!r}")
        if not 0 <= v <= _MAX_LOG2:
            raise ValueError(f"{name} must lie in [0, {_MAX_LOG2}], got {v}")
    if min_log2 > max_log2:
        raise ValueError(f"min_log2={min_log2} must be <= max_log2={max_log2}")
    return int(min_log2), int(max_log2)


def decompose(doc_lengths: Any, min_log2: int, max_log2: int) -> Decomposition:
    """Split every document into power-of-two chunks by the binary digits of its length.

    See the module docstring for the exact rule and chunk order. Vectorised: one pass of numpy
    bit operations per bucket, O(N + chunks) time and memory.

    Args:
        doc_lengths: [N] non-negative integer tokens per document.
        min_log2: smallest chunk is 2^min_log2 tokens; shorter leftovers are dropped.
        max_log2: largest chunk is 2^max_log2 tokens; longer documents yield several.
    Returns:
        Decomposition with a bucket for every i in [min_log2, max_log2].
    Raises:
        ValueError: bad lengths; min_log2 or max_log2 negative, above 62, or min > max.
    """
    lo, hi = _check_log2(min_log2, max_log2)
    lens = as_doc_lengths(doc_lengths)
    docs = np.arange(lens.size, dtype=_I64)
    n_top = lens >> hi
    rem = lens & ((1 << hi) - 1)
    top_docs = np.repeat(docs, n_top)
    buckets: dict[int, tuple[np.ndarray, np.ndarray]] = {hi: (top_docs, ragged_arange(n_top) << hi)}
    for i in range(hi - 1, lo - 1, -1):
        has = np.flatnonzero((rem >> i) & 1)
        # Start: past the M-chunks and the higher set bits of the remainder.
        buckets[i] = (has, (n_top[has] << hi) + ((rem[has] >> (i + 1)) << (i + 1)))
    dropped = int((rem & ((1 << lo) - 1)).sum())
    return Decomposition(
        buckets=dict(sorted(buckets.items())),
        dropped_tokens=dropped,
        min_log2=lo,
        max_log2=hi,
        num_docs=lens.size,
    )
