"""Turn a `Packing` plus a token store into flat training batches.

Legend: T tokens in the batch (sequences x seq_len), N attention documents in the batch (one
per chunk, plus one per sequence with padding).

A batch is several packed sequences laid end to end. Each chunk of a document is its own
attention segment: positions restart at 0, labels never predict across a chunk boundary
except into the same document's next token (read from the store), and the room a sequence
leaves unused is one padding segment that is never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longtrain.config.schema import LOSS_WEIGHTINGS
from longtrain.data.packing import Packing

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One flat batch. Token-wise tensors are [T]; `cu_seqlens` is int32 [N+1] and covers
    padding segments too (they are segments of their own, so nothing attends across them)."""

    tokens: torch.Tensor  # int64 [T]
    labels: torch.Tensor  # int64 [T], IGNORE_INDEX where nothing is trained
    position_ids: torch.Tensor  # int64 [T], restarting at every segment
    cu_seqlens: torch.Tensor  # int32 [N+1]
    loss_weights: torch.Tensor  # float64 [T], 0 where nothing is trained
    segment_is_padding: torch.Tensor  # bool [N]
    num_sequences: int
    num_docs: int  # real (non-padding) segments
    num_padding: int  # padding tokens
    num_truncated: int = 0  # real segments that are a proper part of their document

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max().item())

    def doc_lengths(self) -> np.ndarray:
        """Lengths of the real segments (int64 [num_docs])."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).numpy().astype(np.int64)
        return lengths[~self.segment_is_padding.numpy()]

    def num_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum().item())


def build_batch(
    tokens: np.ndarray,
    offsets: np.ndarray,
    packing: Packing,
    seq_ids: np.ndarray,
    pad_id: int,
    loss_weighting: str = "token",
    loss_mask: np.ndarray | None = None,
) -> PackedBatch:
    """Assemble the sequences `seq_ids` of `packing` into one flat batch of
    len(seq_ids) x packing.seq_len tokens.

    `tokens` is the store's flat token array, `offsets` its int64 [documents + 1] offsets.
    `loss_weighting`: `token` (every trained token weighs 1) or `per_document` (LongAlign:
    each segment's trained tokens weigh 1/N_i, so every document weighs the same; the trainer
    divides by the global sum of weights, i.e. the number of documents).
    `loss_mask`: the store's uint8 [num_tokens] (1: a training target) or None (all are). A
    label whose token is masked is IGNORE_INDEX, so it weighs nothing and its value cannot
    matter; per-document weights count trained tokens only, and a segment without any gets
    weight 0.
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting {loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    seq_len = packing.seq_len
    T = len(seq_ids) * seq_len
    tok_T = np.full(T, pad_id, dtype=np.int64)
    lab_T = np.full(T, IGNORE_INDEX, dtype=np.int64)
    pos_T = np.zeros(T, dtype=np.int64)
    seg_lengths: list[int] = []
    seg_is_pad: list[bool] = []
    truncated = 0
    cursor = 0
    for seq in np.asarray(seq_ids, dtype=np.int64):
        seq_end = cursor + seq_len
        first, last = packing.seq_offsets[seq], packing.seq_offsets[seq + 1]
        if packing.lengths[first:last].sum() > seq_len:
            raise ValueError(f"sequence {seq} of the packing holds more than seq_len={seq_len}")
        for c in range(first, last):
            doc, start, length = packing.doc_ids[c], packing.starts[c], packing.lengths[c]
            lo = offsets[doc] + start
            # One token more than the chunk when the document goes on: it is the last label.
            hi = min(lo + length + 1, offsets[doc + 1])
            piece = np.asarray(tokens[lo:hi], dtype=np.int64)
            tok_T[cursor : cursor + length] = piece[:length]
            targets = piece[1:]
            if loss_mask is not None:  # the label of token t is token t + 1: its mask bit
                targets = np.where(loss_mask[lo + 1 : hi] != 0, targets, IGNORE_INDEX)
            lab_T[cursor : cursor + len(piece) - 1] = targets
            pos_T[cursor : cursor + length] = np.arange(length)
            seg_lengths.append(int(length))
            seg_is_pad.append(False)
            truncated += int(length < offsets[doc + 1] - offsets[doc])
            cursor += int(length)
        if cursor < seq_end:
            pos_T[cursor:seq_end] = np.arange(seq_end - cursor)
            seg_lengths.append(seq_end - cursor)
            seg_is_pad.append(True)
            cursor = seq_end
    cu = np.zeros(len(seg_lengths) + 1, dtype=np.int32)
    np.cumsum(seg_lengths, out=cu[1:])
    labels = torch.from_numpy(lab_T)
    is_pad = torch.tensor(seg_is_pad, dtype=torch.bool)
    pad_lengths = np.asarray(seg_lengths)[np.asarray(seg_is_pad, dtype=bool)]
    trained_T = lab_T != IGNORE_INDEX
    if loss_weighting == "token":
        weights_T = trained_T.astype(np.float64)
    else:
        seg_T = np.repeat(np.arange(len(seg_lengths)), seg_lengths)
        per_seg = np.bincount(seg_T, weights=trained_T, minlength=len(seg_lengths))
        weights_T = np.where(trained_T, 1.0 / np.maximum(per_seg[seg_T], 1.0), 0.0)
    return PackedBatch(
        tokens=torch.from_numpy(tok_T),
        labels=labels,
        position_ids=torch.from_numpy(pos_T),
        cu_seqlens=torch.from_numpy(cu),
        # float64 on the host: exact 1/N_i; the step casts to the model's dtype.
        loss_weights=torch.from_numpy(weights_T),
        segment_is_padding=is_pad,
        num_sequences=len(seq_ids),
        num_docs=int((~is_pad).sum().item()),
        num_padding=int(pad_lengths.sum()),
        num_truncated=truncated,
    )
