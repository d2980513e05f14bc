"""A Llama-style decoder over flat packed batches.

Legend (the project's, kernels/__init__.py): T tokens in the (micro-)batch on this rank,
E model width, Hq query heads (H in names), K key/value heads, D head dim, F SwiGLU width,
V vocabulary.

The batch is flat: several packed sequences concatenated along T, documents delimited by
the attention metadata. The model knows nothing of ranks: `attn_meta` is passed through to
`kernels.attention.VarlenAttention`, which `parallel.apply` may swap for a sequence-parallel
module that understands its own metadata. The loss is tiled (so [T, V] logits never exist);
the forward computes it when given labels, so
that sharded engines (FSDP) see the output projection used inside a forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import VarlenAttention
from kernels.loss import linear_cross_entropy
from kernels.norm import rms_norm
from kernels.rope import apply_rope
from longtrain.config import ModelConfig
from longtrain.model.sharded_init import copy_full_into, copy_rows_into, local_rows, normal_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = backend

    def forward(self, x_TE: torch.Tensor) -> torch.Tensor:
        return rms_norm(x_TE, self.weight, self.eps, backend=self.backend)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE at per-token positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
        self.rope_theta = cfg.rope_theta
        self.kernel_backend = cfg.kernel_backend
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = VarlenAttention(backend=cfg.attn_backend)

    def forward(self, x_TE: torch.Tensor, position_ids_T: torch.Tensor, attn_meta) -> torch.Tensor:
        T = x_TE.shape[0]
        q_THD = self.wq(x_TE).view(T, self.n_heads, self.head_dim)  # (T, Hq D) -> (T, Hq, D)
        k_TKD = self.wk(x_TE).view(T, self.n_kv_heads, self.head_dim)  # (T, K D) -> (T, K, D)
        v_TKD = self.wv(x_TE).view(T, self.n_kv_heads, self.head_dim)
        q_THD = apply_rope(q_THD, position_ids_T, self.rope_theta, backend=self.kernel_backend)
        k_TKD = apply_rope(k_TKD, position_ids_T, self.rope_theta, backend=self.kernel_backend)
        out_THD = self.core(q_THD, k_TKD, v_TKD, attn_meta, causal=True)
        return self.wo(out_THD.reshape(T, self.n_heads * self.head_dim))  # (T, Hq, D) -> (T, E)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)  # down

    def forward(self, x_TE: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TE)) * self.w3(x_TE))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernel_backend)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernel_backend)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x_TE: torch.Tensor, position_ids_T: torch.Tensor, attn_meta) -> torch.Tensor:
        x_TE = x_TE + self.attn(self.attn_norm(x_TE), position_ids_T, attn_meta)
        return x_TE + self.mlp(self.mlp_norm(x_TE))


IGNORE_INDEX = -100  # a label that is not trained (longtrain.data.batch's)


class TiledLossHead:
    """The output head both decoders share (ours and model=hf). Needs `output_weight()`,
    `cfg.kernel_backend` and `loss_tile_tokens` (set by train.memory.loss_tile_tokens).

    Evaluation sets `record_token_losses` (from outside, as the memory stack sets
    `loss_tile_tokens`): the forward then also leaves each token's cross-entropy in
    `token_losses` (float32, float64 for float64 models, [T], 0 where not trained) and its
    most likely next token in `token_argmax` (int64 [T]), computed in tiles inside the
    forward, where a sharded output weight is gathered."""

    record_token_losses = False
    token_losses: torch.Tensor | None = None
    token_argmax: torch.Tensor | None = None

    def loss_head(
        self,
        hidden_TE: torch.Tensor,
        labels_T: torch.Tensor | None,
        loss_weights_T: torch.Tensor | None,
    ) -> torch.Tensor:
        """hidden [T, E] when `labels_T` is None, else the weighted loss sum, in tiles."""
        if labels_T is None:
            return hidden_TE
        if self.record_token_losses:
            self.token_losses, self.token_argmax = self._token_losses(hidden_TE, labels_T)
        return linear_cross_entropy(
            hidden_TE,
            self.output_weight(),
            labels_T,
            loss_weights_T,
            tile_tokens=self.loss_tile_tokens,
            backend=self.cfg.kernel_backend,
        )

    @torch.no_grad()
    def _token_losses(
        self, hidden_TE: torch.Tensor, labels_T: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy [T], argmax [T]) of every token, one tile of logits at a time."""
        weight_VE = self.output_weight()
        compute = torch.float64 if torch.float64 in (hidden_TE.dtype, weight_VE.dtype) else None
        compute = compute or torch.float32
        ce_T = torch.zeros(labels_T.shape, dtype=compute, device=hidden_TE.device)
        argmax_T = torch.zeros(labels_T.shape, dtype=torch.int64, device=hidden_TE.device)
        for lo in range(0, hidden_TE.shape[0], self.loss_tile_tokens):
            hi = lo + self.loss_tile_tokens
            logits = hidden_TE[lo:hi].to(compute) @ weight_VE.to(compute).t()
            ce_T[lo:hi] = F.cross_entropy(
                logits, labels_T[lo:hi], ignore_index=IGNORE_INDEX, reduction="none"
            )
            argmax_T[lo:hi] = logits.argmax(dim=-1)
        return ce_T, argmax_T

    def logits(self, hidden_TE: torch.Tensor) -> torch.Tensor:
        """Materialised logits [T, V] (tests and inference only; training uses the tiled loss)."""
        return hidden_TE @ self.output_weight().t()


class Transformer(TiledLossHead, nn.Module):
    """Embedding -> N blocks -> final norm. `forward` returns hidden states, not logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.kernel_backend)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.loss_tile_tokens = 4096  # tokens per loss tile (train.memory.loss_tile_tokens)

    def output_weight(self) -> torch.Tensor:
        """The [V, E] output projection (the embedding when tied)."""
        return self.embed.weight if self.output is None else self.output.weight

    def forward(
        self,
        tokens_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        attn_meta,
        labels_T: torch.Tensor | None = None,
        loss_weights_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens_T, position_ids_T: int64 [T].

        Without labels: hidden states [T, E] after the final norm. With `labels_T` (int64 [T],
        -100 = not trained) and optional `loss_weights_T` (float [T]): the weighted *sum* of
        token cross-entropies (scalar), computed in tiles so [T, V] logits never exist. The
        sum, not the mean: the trainer divides by the global count of trained tokens.
        """
        x_TE = self.embed(tokens_T)
        for layer in self.layers:
            x_TE = layer(x_TE, position_ids_T, attn_meta)
        return self.loss_head(self.norm(x_TE), labels_T, loss_weights_T)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from `seed` alone: the same full weights on every rank, at any
        world size and layout. Parameters may be sharded (FSDP2's DTensors, after a meta
        start): each tensor's full values are drawn in turn, in row chunks, and this rank keeps
        the rows of its shard (`longtrain.model.sharded_init`), so it never holds more than
        its shards plus one chunk."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual projections, GPT-2 style
        for name, p in self.named_parameters():
            if p.dim() == 1:
                copy_full_into(p, torch.ones(p.shape))  # norm weights
                continue
            scale = out_std if name.endswith(("wo.weight", "w2.weight")) else std
            if local_rows(p) is None:
                full = torch.cat([rows for _, rows in normal_rows(gen, p.shape, scale)])
                copy_full_into(p, full)
                continue
            for first_row, rows in normal_rows(gen, p.shape, scale):
                copy_rows_into(p, first_row, rows)


def set_rope_theta(model: nn.Module, theta: float) -> None:
    """Set the RoPE base of every attention module (context-length stages change it).

    Models with their own `set_rope_theta` (model=hf) are asked to do it themselves."""
    if hasattr(model, "set_rope_theta"):
        model.set_rope_theta(theta)
        return
    found = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.rope_theta = theta
            found += 1
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention whose RoPE base can change")


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the offending field when the shapes do not fit together."""
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size must be positive, got {cfg.vocab_size}")
    # The attention kernels check Hq % K on every call too; this check names the config
    # fields and fails before any work (`longtrain.check` runs it before a launch).
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"model.n_heads ({cfg.n_heads}) must be a multiple of model.n_kv_heads "
            f"({cfg.n_kv_heads})"
        )
    head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
    if not cfg.head_dim and cfg.dim % cfg.n_heads:
        raise ValueError(f"model.dim ({cfg.dim}) must be divisible by n_heads ({cfg.n_heads})")
    if head_dim % 2:
        raise ValueError(f"head dim {head_dim} must be even for RoPE")
