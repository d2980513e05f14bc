"""Parameter counts and training FLOPs, for MFU.

Counts multiply-adds as 2 FLOPs; a training step is forward + backward = 3x forward.
Attention FLOPs depend on which (query, key) pairs are attended, so they are counted from the
documents of the batch, not from seq_len.
"""

from __future__ import annotations

import numpy as np

from longtrain.config import ModelConfig


def param_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Number of parameters of the model `cfg` describes."""
    head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
    attn = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    norms = 2 * cfg.dim
    blocks = cfg.n_layers * (attn + mlp + norms) + cfg.dim
    embed = cfg.vocab_size * cfg.dim
    output = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return blocks + output + (embed if include_embedding else 0)


def train_flops(cfg: ModelConfig, num_tokens: int, attended_pairs: int) -> float:
    """FLOPs of one training step over `num_tokens` trained positions.

    `attended_pairs`: number of (query, key) pairs attended, summed over documents
    (causal: l(l+1)/2 per document of length l). Dense part: 6 x (non-embedding params incl.
    the output projection) per token; attention: QK^T and PV, 2 matmuls x 2 FLOPs x head
    width per pair, times 3 for forward + backward.
    """
    head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
    dense = 6.0 * param_count(cfg, include_embedding=False) * num_tokens
    attn = 12.0 * cfg.n_layers * cfg.n_heads * head_dim * attended_pairs
    return dense + attn


def causal_pairs(doc_lengths: np.ndarray) -> int:
    """sum l(l+1)/2 over documents: the (query, key) pairs of causal attention."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    return int((lengths * (lengths + 1) // 2).sum())
