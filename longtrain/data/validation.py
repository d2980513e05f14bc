"""The validation split: documents held out of training, and the fixed sequences evaluated.

`data.val_fraction` of the store's documents are held out, chosen by a generator with a fixed
seed over the document count alone, so the same store always splits the same way (whatever
train.seed, world size or layout). Training packs the other documents only (`train_packer`
renumbers a packing of a subset back to store document ids); evaluation packs the held-out
ones with best-fit at data.seq_len and takes the first `count` sequences, the same at every
evaluation and in every layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from longtrain.data.packing import Packing, best_fit
from longtrain.errors import DataError

SPLIT_SEED = 20_241_130  # fixed: the split depends on the store alone


def split_documents(num_docs: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), int64 sorted, of `num_docs` documents; each document is
    held out with probability `val_fraction` (at least one each way when it is > 0)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = np.arange(num_docs, dtype=np.int64)
    if val_fraction == 0:
        return ids, ids[:0]
    if num_docs < 2:
        raise DataError(
            f"data.val_fraction={val_fraction}: the store holds {num_docs} document(s), too "
            "few to hold one out; use more data or data.val_fraction=0"
        )
    draws = np.random.default_rng(SPLIT_SEED).random(num_docs)
    held = draws < val_fraction
    if not held.any():
        held[np.argmin(draws)] = True
    if held.all():
        held[np.argmax(draws)] = False
    return ids[~held], ids[held]


def remap_packing(packing: Packing, doc_ids: np.ndarray) -> Packing:
    """A packing of the documents `doc_ids` (numbered 0..len-1 in it) with store ids."""
    return replace(packing, doc_ids=doc_ids[packing.doc_ids])


def train_packer(packer: Callable, doc_ids: np.ndarray) -> Callable:
    """`packer(all doc lengths, seq_len)` restricted to `doc_ids`, in store ids."""

    def pack(doc_lengths: np.ndarray, seq_len: int) -> Packing:
        return remap_packing(packer(doc_lengths[doc_ids], seq_len), doc_ids)

    return pack


def eval_packing(doc_lengths: np.ndarray, val_ids: np.ndarray, seq_len: int) -> Packing:
    """The held-out documents packed best-fit into sequences of `seq_len`, store ids."""
    if val_ids.size == 0:
        raise DataError("evaluation needs held-out documents: set data.val_fraction > 0")
    return remap_packing(best_fit(doc_lengths[val_ids], seq_len), val_ids)


__all__ = ["SPLIT_SEED", "eval_packing", "remap_packing", "split_documents", "train_packer"]
