"""The `Packing` type (documents packed into sequences, in CSR form) and the input checks that
every packer shares.

Legend: N documents, C chunks, S sequences; seq_len the most tokens a sequence may hold.
Every array is numpy int64.

Chunk c is document `doc_ids[c]`, tokens `[starts[c], starts[c] + lengths[c])`; sequence s
holds chunks `seq_offsets[s]:seq_offsets[s + 1]` in that order. The packers live in
`longtrain.data.packing`, which re-exports everything here.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

_I64 = np.int64


def as_doc_lengths(doc_lengths: Any) -> np.ndarray:
    """Check and convert document lengths.

    Args:
        doc_lengths: 1-D array-like of non-negative integers (tokens per document); an empty
            sequence of any dtype is accepted.
    Returns:
        [N] int64 array (a copy only where a conversion is needed).
    Raises:
        ValueError: not 1-D, not integers (floats and bools are refused), negative, or above
            the int64 range.
    """
    arr = np.asarray(doc_lengths)
    if arr.ndim != 1:
        raise ValueError(f"doc_lengths must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, _I64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"doc_lengths must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > np.iinfo(_I64).max:
        raise ValueError(f"doc_lengths holds {int(arr.max())}, above the int64 range")
    arr = arr.astype(_I64, copy=False)
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        bad = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"doc_lengths[{bad}] = {int(arr[bad])} is negative")
    return arr


def check_seq_len(seq_len: Any, name: str = "seq_len") -> int:
    """Check that a count (`seq_len` by default) is an integer >= 1; return it as an int.

    Args:
        seq_len: the value; Python or numpy integers (not bools, not floats).
        name: how the error message names it.
    """
    if isinstance(seq_len, bool | np.bool_):
        raise ValueError(f"{name} must be an integer >= 1, got {seq_len!r}")
    try:
        value = operator.index(seq_len)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {seq_len!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return value


def ragged_arange(counts: np.ndarray) -> np.ndarray:
    """Concatenated ranges: [sum(counts)] int64 0..counts[0]-1, 0..counts[1]-1, ...

    Args:
        counts: [k] non-negative integers.
    """
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total, dtype=_I64) - np.repeat(ends - counts, counts)


@dataclass(frozen=True)
class Packing:
    """Documents packed into sequences, in CSR form (every array numpy int64).

    Attributes:
        doc_ids: [C] document of chunk c.
        starts: [C] first token of chunk c inside its document.
        lengths: [C] tokens in chunk c, >= 1.
        seq_offsets: [S + 1] sequence s holds chunks seq_offsets[s]:seq_offsets[s + 1].
        seq_len: the most tokens a sequence may hold (shorter ones are padded by the loader).
        num_skipped_docs: zero-length documents, which appear in no chunk.
    """

    doc_ids: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    seq_offsets: np.ndarray
    seq_len: int
    num_skipped_docs: int = 0

    def __post_init__(self) -> None:
        check_seq_len(self.seq_len)
        for name in ("doc_ids", "starts", "lengths", "seq_offsets"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != _I64 or arr.ndim != 1:
                raise ValueError(f"Packing.{name} must be a 1-D int64 numpy array")
        c = self.doc_ids.size
        if self.starts.size != c or self.lengths.size != c:
            raise ValueError(
                f"doc_ids, starts, lengths must have one size, got "
                f"{c}, {self.starts.size}, {self.lengths.size}"
            )
        if self.seq_offsets.size < 1:
            raise ValueError("seq_offsets must hold at least one entry (0)")
        if self.num_skipped_docs < 0:
            raise ValueError(f"num_skipped_docs must be >= 0, got {self.num_skipped_docs}")

    @property
    def num_sequences(self) -> int:
        """S, the number of sequences."""
        return self.seq_offsets.size - 1

    @property
    def num_chunks(self) -> int:
        """C, the number of chunks."""
        return self.doc_ids.size

    @property
    def num_tokens(self) -> int:
        """Tokens held by all sequences (padding excluded)."""
        return int(self.lengths.sum())

    def seq_lengths(self) -> np.ndarray:
        """[S] int64 tokens held by each sequence (<= seq_len; the rest is padding)."""
        cum = np.concatenate([np.zeros(1, _I64), np.cumsum(self.lengths)])
        return cum[self.seq_offsets[1:]] - cum[self.seq_offsets[:-1]]

    def _chunks_per_doc(self) -> np.ndarray:
        if self.num_chunks == 0:
            return np.zeros(0, _I64)
        return np.bincount(self.doc_ids)

    @property
    def num_truncations(self) -> int:
        """Cuts made in documents: a document held by k chunks was cut k - 1 times."""
        per_doc = self._chunks_per_doc()
        return self.num_chunks - int(np.count_nonzero(per_doc))

    @property
    def num_truncated_docs(self) -> int:
        """Documents cut at least once (held by two chunks or more)."""
        return int(np.count_nonzero(self._chunks_per_doc() > 1))

    @property
    def padding_tokens(self) -> int:
        """S * seq_len - num_tokens: slots the loader fills with padding."""
        return self.num_sequences * self.seq_len - self.num_tokens

    def validate(self, doc_lengths: Any, complete: bool = True) -> None:
        """Check every invariant against the documents; raise ValueError naming the first breach.

        Checks: offsets start at 0, end at C and never decrease; every sequence holds a chunk and
        at most seq_len tokens; every chunk is non-empty and lies inside its document; no token
        is held twice. With `complete` (a packing of the whole corpus), also: every token of
        every document is held exactly once and `num_skipped_docs` counts the empty documents.

        Args:
            doc_lengths: [N] integer tokens per document, as given to the packer.
            complete: False for a partial view (one decomposition bucket).
        """
        lens = as_doc_lengths(doc_lengths)
        off, c = self.seq_offsets, self.num_chunks
        if off[0] != 0 or off[-1] != c:
            raise ValueError(f"seq_offsets must run from 0 to {c}, got {off[0]}..{off[-1]}")
        per_seq = np.diff(off)
        if per_seq.size and per_seq.min() < 1:
            bad = int(np.flatnonzero(per_seq < 1)[0])
            raise ValueError(f"sequence {bad} holds {int(per_seq[bad])} chunks (need >= 1)")
        if c and self.lengths.min() < 1:
            raise ValueError(f"chunk {int(np.argmin(self.lengths))} is empty")
        if c and (self.doc_ids.min() < 0 or self.doc_ids.max() >= lens.size):
            raise ValueError(f"doc_ids must lie in [0, {lens.size}), got {self.doc_ids.min()}..")
        if c and self.starts.min() < 0:
            raise ValueError(f"chunk {int(np.argmin(self.starts))} starts before its document")
        ends = self.starts + self.lengths
        over = np.flatnonzero(ends > lens[self.doc_ids])
        if over.size:
            i = int(over[0])
            raise ValueError(
                f"chunk {i} ends at {int(ends[i])}, past document {int(self.doc_ids[i])} "
                f"of length {int(lens[self.doc_ids[i]])}"
            )
        seq_tokens = self.seq_lengths()
        if seq_tokens.size and seq_tokens.max() > self.seq_len:
            seq = int(np.argmax(seq_tokens))
            raise ValueError(
                f"sequence {seq} holds {int(seq_tokens[seq])} > seq_len={self.seq_len}"
            )
        order = np.lexsort((self.starts, self.doc_ids))
        d, s, e = self.doc_ids[order], self.starts[order], ends[order]
        same = d[1:] == d[:-1]
        if np.any(same & (s[1:] < e[:-1])):
            i = int(np.flatnonzero(same & (s[1:] < e[:-1]))[0])
            raise ValueError(f"document {int(d[i])}: token {int(s[i + 1])} is held twice")
        if not complete:
            return
        if np.any(same & (s[1:] != e[:-1])):
            i = int(np.flatnonzero(same & (s[1:] != e[:-1]))[0])
            raise ValueError(f"document {int(d[i])}: tokens {int(e[i])}..{int(s[i + 1])} missing")
        covered = np.zeros(lens.size, _I64)
        if c:
            np.add.at(covered, self.doc_ids, self.lengths)
        miss = np.flatnonzero(covered != lens)
        if miss.size:
            i = int(miss[0])
            raise ValueError(f"document {i}: {int(covered[i])} of {int(lens[i])} tokens held")
        empty = int(np.count_nonzero(lens == 0))
        if self.num_skipped_docs != empty:
            raise ValueError(f"num_skipped_docs={self.num_skipped_docs}, expected {empty}")


__all__ = ["Packing", "as_doc_lengths", "check_seq_len", "ragged_arange"]
