"""Train a local Hugging Face causal LM (Llama, Qwen2, Mistral) with longtrain's machinery.

Legend (the project's, kernels/__init__.py): T tokens in the flat micro-batch on this rank,
E model width, Hq query heads (H in names), K key/value heads, D head dim, V vocabulary.

`model=hf model.path=DIR` builds the `transformers` model of DIR (config.json; weights from
safetensors when present, else a seeded random init) and wraps it in `HFCausalLM`, which has
the interface of `longtrain.model.llama.Transformer`. Attention goes through transformers'
public attention interface: we register `longtrain_varlen`, an attention function that takes
the module's q/k/v ([1, Hq, T, D], after HF's RoPE) and calls the
`kernels.attention.VarlenAttention` that `attach_varlen_attention` hangs on every attention
module as `longtrain_core`. `parallel.apply` finds those submodules like any other and swaps
them for sequence-parallel ones, so ulysses / ring / usp apply unchanged. Our `attn_meta`
reaches the attention function as the keyword `longtrain_attn_meta`: transformers passes the
`**kwargs` of the base model's forward down through every decoder layer to the attention
function. No causal mask is built: transformers skips mask creation for an attention
implementation without a registered mask function, and documents are delimited by the varlen
metadata alone (positions restart per document; `use_cache=False`).

The shape fields of `ModelConfig` come from config.json through the `hf_config` OmegaConf
resolver (see configs/model/hf.yaml), so the mesh checks, FLOP accounting and the saved run
config see the real model; `build_hf_model` refuses a config that disagrees with config.json.

Precision note: transformers' Llama/Qwen2/Mistral compute RMSNorm variance and RoPE angles
in float32 even in a float64 model; a float64 run keeps those float32 roundings (they are
deterministic per token, so layouts still agree to ~1e-10).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kernels.attention import VarlenAttention
from longtrain.config import ModelConfig
from longtrain.config.hf import (
    check_model_config,
    check_seq_len,
    hf_model_config,
    load_hf_config,
    model_fields,
)
from longtrain.model.hf_shards import init_hf_shards, params_on_meta
from longtrain.model.llama import TiledLossHead
from longtrain.model.sharded_init import materialize_storage

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "longtrain_varlen"  # our name in transformers' AttentionInterface
ATTN_META_KWARG = "longtrain_attn_meta"  # forward kwarg that carries attn_meta to attention
CORE_ATTR = "longtrain_core"  # the VarlenAttention submodule on each HF attention module
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# --------------------------------------------------------------------------------------------
# The attention function and its submodules


def longtrain_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function `longtrain_varlen`.

    query [1, Hq, T, D], key / value [1, K, T, D] (after RoPE); `kwargs[ATTN_META_KWARG]` is
    the attention metadata of the batch. Calls `module.longtrain_core` (a VarlenAttention or
    its sequence-parallel replacement) and returns (out [1, T, Hq, D], None).
    """
    meta = kwargs.get(ATTN_META_KWARG)
    if meta is None:
        raise ValueError(
            f"attention {ATTN_IMPLEMENTATION!r} needs the batch's varlen metadata as the "
            f"keyword {ATTN_META_KWARG!r}: call the model through HFCausalLM.forward"
        )
    core = getattr(module, CORE_ATTR, None)
    if core is None:
        raise ValueError(
            f"{type(module).__name__} has no {CORE_ATTR!r} submodule: build the model with "
            "build_hf_model (or call attach_varlen_attention)"
        )
    if attention_mask is not None:
        raise ValueError(
            "attention_mask is not supported with packed batches: documents are delimited by "
            f"{ATTN_META_KWARG} (cu_seqlens); pass attention_mask=None"
        )
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported; set it to 0.0")
    if query.shape[0] != 1:
        raise ValueError(f"expected one flat packed sequence (batch 1), got {query.shape[0]}")
    longest = getattr(meta, "max_seqlen_k", None)  # VarlenMeta; SP metas: see check_seq_len
    if sliding_window is not None and longest is not None and longest > sliding_window:
        raise ValueError(
            f"a document of {longest} tokens exceeds the sliding window {sliding_window}; "
            "longtrain's attention is full causal (see longtrain.model.hf.check_seq_len)"
        )
    # Under autocast, HF's float32 RoPE tables promote q and k to float32 while v stays in
    # the autocast dtype: attend in the autocast dtype, as sdpa under autocast would.
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    # (1, Hq, T, D) -> (T, Hq, D): a view of the projection's contiguous [T, Hq*D] output.
    q_THD = query[0].transpose(0, 1).contiguous()
    k_TKD = key[0].transpose(0, 1).contiguous()
    v_TKD = value[0].transpose(0, 1).contiguous()
    out_THD = core(q_THD, k_TKD, v_TKD, meta, causal=True, softmax_scale=scaling)
    return out_THD.unsqueeze(0), None  # (T, Hq, D) -> (1, T, Hq, D), as HF's o_proj expects


def register_attention() -> None:
    """Register `longtrain_varlen` in transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, longtrain_varlen_attention)


def attach_varlen_attention(hf_model: nn.Module, backend: str) -> int:
    """Attach a `VarlenAttention(backend)` as `longtrain_core` to the self-attention module of
    every decoder layer of `hf_model`; returns how many."""
    layers = hf_model.base_model.layers
    for layer in layers:
        setattr(layer.self_attn, CORE_ATTR, VarlenAttention(backend=backend))
    return len(layers)


# --------------------------------------------------------------------------------------------
# The wrapper


class HFCausalLM(TiledLossHead, nn.Module):
    """A transformers causal LM behind the interface of `longtrain.model.Transformer`.

    `hf` is the transformers model (its state dict keys are HF's under the prefix `hf.`);
    `layers` its decoder layers (for FSDP and activation checkpointing); `cfg` the
    `ModelConfig` (shapes from config.json).
    """

    def __init__(self, cfg: ModelConfig, hf_model: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.hf = hf_model
        self.loss_tile_tokens = 4096  # tokens per tile of the loss (train.memory sets it)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers ([1, T, E] -> [1, T, E] each)."""
        return self.hf.base_model.layers

    def output_weight(self) -> torch.Tensor:
        """The [V, E] output projection (the embedding when tied)."""
        return self.hf.get_output_embeddings().weight

    def forward(
        self,
        tokens_T: torch.Tensor,
        position_ids_T: torch.Tensor,
        attn_meta,
        labels_T: torch.Tensor | None = None,
        loss_weights_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens_T, position_ids_T: int64 [T] (positions restart at every document).

        Without labels: hidden states [T, E] after the final norm. With `labels_T` (int64 [T],
        -100 = not trained) and optional `loss_weights_T` (float [T]): the weighted *sum* of
        token cross-entropies (scalar), tiled so [T, V] logits never exist.
        """
        out = self.hf.base_model(
            input_ids=tokens_T.unsqueeze(0),  # [T] -> [1, T]: one flat packed sequence
            position_ids=position_ids_T.unsqueeze(0),
            use_cache=False,
            **{ATTN_META_KWARG: attn_meta},
        )
        return self.loss_head(out.last_hidden_state[0], labels_T, loss_weights_T)

    @torch.no_grad()
    def set_rope_theta(self, theta: float) -> None:
        """Change the RoPE base (context-length stages): transformers' rotary tables are
        recomputed from the config with the new theta, by the function its __init__ uses."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = self.hf.config
        rotary = self.hf.base_model.rotary_emb
        config.rope_parameters["rope_theta"] = float(theta)  # also what an export will record
        rope_type = config.rope_parameters.get("rope_type", "default")
        init = (
            rotary.compute_default_rope_parameters
            if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type]
        )
        inv_freq, rotary.attention_scaling = init(config)
        rotary.inv_freq.copy_(inv_freq)
        rotary.original_inv_freq.copy_(inv_freq)


def has_weights(path: str | Path) -> bool:
    """Whether the directory holds weights transformers can load (safetensors or .bin)."""
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def build_hf_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> HFCausalLM:
    """Build the model of `cfg.path` (weights when present, else a random init from `seed`,
    identical on every rank), with `longtrain_varlen` attention.

    Parameters are float32 (the master weights of bfloat16 runs) or float64 for float64 runs,
    as for our own model. Raises ValueError when `cfg` disagrees with config.json or the
    checkpoint lacks weights the model needs. `device="meta"`: parameters without storage
    (buffers computed), for a meta start that loads the weights into shards afterwards.
    """
    from transformers import AutoModelForCausalLM

    config = load_hf_config(cfg.path)
    check_model_config(cfg, config)
    config.use_cache = False
    register_attention()
    param_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    if torch.device(device).type == "meta" or not has_weights(cfg.path):
        # Parameters without storage, buffers computed: the weights come later, sharded
        # (`longtrain.model.hf_shards`), or here for a whole model without weights, by the
        # same module-by-module init a meta start uses, so both give the same model.
        with params_on_meta():
            hf_model = AutoModelForCausalLM.from_config(
                config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32
            )
        if torch.device(device).type != "meta":
            materialize_storage(hf_model, device)
            init_hf_shards(hf_model, seed)
            log.info("model=hf: no weights in %s, random init (seed %d)", cfg.path, seed)
        attach_varlen_attention(hf_model, cfg.attn_backend)
        return HFCausalLM(cfg, hf_model.to(dtype=param_dtype))
    # Loaded in float32 whatever the run's dtype.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # anything the checkpoint lacks (refused below)
        hf_model, info = AutoModelForCausalLM.from_pretrained(
            cfg.path,
            config=config,
            attn_implementation=ATTN_IMPLEMENTATION,
            dtype=torch.float32,
            output_loading_info=True,
        )
    missing = list(info.get("missing_keys", []))
    if missing:
        raise ValueError(
            f"the weights in {cfg.path} lack {len(missing)} tensors the model needs "
            f"(first: {sorted(missing)[:3]}); check that config.json matches them"
        )
    log.info("model=hf: loaded %s weights from %s", config.model_type, cfg.path)
    attach_varlen_attention(hf_model, cfg.attn_backend)
    return HFCausalLM(cfg, hf_model.to(device=device, dtype=param_dtype))


__all__ = [
    "ATTN_IMPLEMENTATION",
    "ATTN_META_KWARG",
    "HFCausalLM",
    "attach_varlen_attention",
    "build_hf_model",
    "check_model_config",
    "check_seq_len",
    "hf_model_config",
    "load_hf_config",
    "longtrain_varlen_attention",
    "model_fields",
    "register_attention",
]
