"""The step's loss normalisation against a direct computation of each weighting."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels.attention import VarlenMeta
from longtrain.config import ModelConfig
from longtrain.data.batch import IGNORE_INDEX, build_batch
from longtrain.data.packing import best_fit
from longtrain.model import build_model

CFG = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                  dtype="float64", attn_backend="torch", kernel_backend="torch")  # fmt: skip


@pytest.mark.parametrize("weighting", ["token", "per_document"])
def test_weighted_loss_equals_direct_formula(weighting):
    lengths = np.array([3, 17, 9, 30, 2, 11])
    tokens = np.random.default_rng(0).integers(0, 50, size=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    packing = best_fit(lengths, seq_len=32)
    batch = build_batch(tokens, offsets, packing, np.arange(packing.num_sequences), 0, weighting)
    meta = VarlenMeta(batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen)
    model = build_model(CFG, seed=0)
    w = batch.loss_weights
    loss = model(batch.tokens, batch.position_ids, meta, batch.labels, w) / w.sum()
    # Direct: cross-entropy per token from materialised logits, averaged as the weighting says.
    hidden = model(batch.tokens, batch.position_ids, meta)
    ce = F.cross_entropy(model.logits(hidden), batch.labels, ignore_index=IGNORE_INDEX,
                         reduction="none")  # fmt: skip
    trained = batch.labels != IGNORE_INDEX
    if weighting == "token":
        direct = ce[trained].mean()
    else:
        cu = batch.cu_seqlens.tolist()
        per_doc = [
            ce[a:b][trained[a:b]].mean() for a, b in zip(cu[:-1], cu[1:]) if trained[a:b].any()
        ]
        direct = torch.stack(per_doc).mean()
    # float64; the tiled loss only reassociates the same sums.
    torch.testing.assert_close(loss, direct, rtol=1e-12, atol=0)
