"""Evaluation on held-out documents: the loss, and the loss by position in the document.

Every `train.eval_every` steps the run evaluates a fixed set of packed sequences of the
held-out documents (`longtrain.data.validation`: data.val_fraction of the store, or every
document of data.val_source; best-fit at data.seq_len, the first `train.eval_sequences`)
without gradients, under the run's own layout: each data-parallel rank takes its share (the
same count on every rank, as every forward is collective), the sequence-parallel ranks shard
each sequence as in training, and the sums are reduced over all ranks (each token is on
exactly one rank). So the numbers do not depend on the layout beyond reassociation.

Loss by position: each trained token's cross-entropy goes into the bucket of its position in
its segment (0-based; bucket "1" is position 0, "2" position 1, "4" positions 2-3, ...,
"2^b" positions [2^(b-1), 2^b)), up to data.seq_len. A held-out document longer than
seq_len is cut into seq_len chunks, whose positions restart: the position is the context
the model saw. This is the usual evidence that a model uses its context (the loss keeps
falling with position).
"""

from __future__ import annotations

import numpy as np
import torch

from longtrain.config import RunConfig
from longtrain.data.batch import IGNORE_INDEX, build_batch
from longtrain.data.token_store import TokenStore
from longtrain.data.validation import eval_packing, split_documents
from longtrain.distributed import all_reduce_sum
from longtrain.errors import DataError
from longtrain.trainer.step import StepContext, forward_token_losses, shard_micro_batch


def position_buckets(seq_len: int) -> list[int]:
    """The bucket keys of `loss_by_position`: 1, 2, 4, ..., 2^b, where key K holds positions
    [K / 2, K) (key 1: position 0), up to the bucket of position seq_len - 1."""
    return [1 << b for b in range(int(seq_len - 1).bit_length() + 1)]


class Evaluator:
    """The held-out sequences of this data-parallel rank, and `evaluate` (collective)."""

    def __init__(
        self, store: TokenStore, cfg: RunConfig, dp_rank: int, dp_size: int, ctx: StepContext
    ) -> None:
        """`store`: the training store (data.val_fraction: its held-out documents) or the
        store of data.val_source (every document)."""
        if cfg.data.val_source:
            val_ids = np.arange(store.num_docs, dtype=np.int64)
        else:
            _, val_ids = split_documents(store.num_docs, cfg.data.val_fraction)
        seq_len = cfg.data.seq_len
        self.packing = eval_packing(store.doc_lengths, val_ids, seq_len)
        available = len(self.packing.seq_offsets) - 1
        wanted = min(cfg.train.eval_sequences or cfg.train.global_batch, available)
        count = wanted // dp_size * dp_size  # every rank runs the same number of forwards
        if count == 0:
            raise DataError(
                f"the held-out documents make {available} sequence(s) of {seq_len} tokens, "
                f"fewer than the {dp_size} data-parallel ranks; raise data.val_fraction"
            )
        self.seq_ids = np.arange(count, dtype=np.int64)[dp_rank::dp_size]
        self.micro = max(1, cfg.train.micro_batch or len(self.seq_ids))
        self.store, self.cfg, self.ctx, self.dp_size = store, cfg, ctx, dp_size
        self.buckets = position_buckets(seq_len)

    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        """The eval line of step `step` (collective over every rank): `step`, `eval_loss`
        (mean cross-entropy of the trained held-out tokens), `eval_tokens` (their count),
        `eval_sequences`, `loss_by_position` ({bucket: mean loss or None})."""
        nb = len(self.buckets)
        device = self.ctx.device
        sums = torch.zeros(2 + 2 * nb, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(self.seq_ids), self.micro):
                mb = build_batch(
                    self.store.tokens,
                    self.store.offsets,
                    self.packing,
                    self.seq_ids[i : i + self.micro],
                    self.store.pad_id,
                    "token",
                    self.store.loss_mask,
                )
                local = shard_micro_batch(mb, self.ctx)
                ce_T = forward_token_losses(model, local, self.ctx)[0].to(torch.float64)
                trained_T = local.labels != IGNORE_INDEX
                pos_T = local.position_ids
                # bucket b: positions [2^(b-1), 2^b), b = bit length of the position
                bucket_T = torch.where(
                    pos_T > 0, torch.floor(torch.log2(pos_T.clamp(min=1).double())).long() + 1, 0
                ).clamp(max=nb - 1)
                sums[0] += ce_T[trained_T].sum()
                sums[1] += trained_T.sum()
                sums[2 : 2 + nb].index_add_(0, bucket_T[trained_T], ce_T[trained_T])
                ones = torch.ones(int(trained_T.sum()), dtype=torch.float64, device=device)
                sums[2 + nb :].index_add_(0, bucket_T[trained_T], ones)
        finally:
            model.train(was_training)
        all_reduce_sum(sums, self.ctx.world_group)
        total, count = sums[0].item(), int(sums[1].item())
        by_position = {
            str(b): (sums[2 + k].item() / sums[2 + nb + k].item() if sums[2 + nb + k] else None)
            for k, b in enumerate(self.buckets)
        }
        return {
            "step": step,
            "eval_loss": total / count if count else float("nan"),
            "eval_tokens": count,
            "eval_sequences": len(self.seq_ids) * self.dp_size,
            "loss_by_position": by_position,
        }


__all__ = ["Evaluator", "position_buckets"]
