"""Shapes of a local Hugging Face model from its config.json, for `model=hf model.path=DIR`.

`configs/model/hf.yaml` fills the shape fields of `ModelConfig` through the `hf_config`
OmegaConf resolver (registered by `longtrain.config.register_configs`, at start-up), so the
mesh checks, FLOP accounting and the saved run config see the real model. Reading config.json
needs transformers' `AutoConfig`, imported only when a model=hf config is resolved.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from longtrain.config.schema import ModelConfig

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")  # config.json model_type
# RoPE variants whose frequencies depend on the longest position in the batch: under packing
# and sequence parallelism each rank sees different positions, so they cannot be exact.
_BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


def load_hf_config(path: str | Path):
    """The transformers config of the local directory `path`, checked for what we support.

    Raises ValueError naming the field and the fix for an unsupported family, a missing
    directory, attention dropout or a batch-dependent RoPE variant.
    """
    from transformers import AutoConfig

    path = Path(path) if path else None
    if path is None or not (path / "config.json").is_file():
        raise ValueError(
            f"model.path={str(path or '')!r} must be a local Hugging Face model directory with a "
            "config.json (model=hf model.path=DIR)"
        )
    config = AutoConfig.from_pretrained(str(path))
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"{path}/config.json has model_type={config.model_type!r}; model=hf supports "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) != 0.0:
        raise ValueError(
            f"{path}/config.json has attention_dropout={config.attention_dropout}; longtrain's "
            "varlen attention has no dropout: set it to 0.0"
        )
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type in _BATCH_DEPENDENT_ROPE:
        raise ValueError(
            f"{path}/config.json uses rope_type={rope_type!r}, whose frequencies depend on the "
            "longest position of each batch; packed and sequence-parallel batches need a "
            "position-only RoPE (default, linear, llama3, yarn)"
        )
    return config


def model_fields(config) -> dict:
    """Our `ModelConfig` shape fields from a transformers config of a supported family."""
    heads = config.num_attention_heads
    return {
        "vocab_size": int(config.vocab_size),
        "dim": int(config.hidden_size),
        "n_layers": int(config.num_hidden_layers),
        "n_heads": int(heads),
        "n_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "ffn_dim": int(config.intermediate_size),
        "rope_theta": float(config.rope_parameters["rope_theta"]),
        "norm_eps": float(config.rms_norm_eps),
        "tie_embeddings": bool(config.tie_word_embeddings),
        "init_std": float(config.initializer_range),
    }


def hf_config_value(path: str, field: str):
    """The value of our `ModelConfig.<field>` for the model in `path` (the `hf_config`
    resolver: `${hf_config:${.path},dim}` in configs/model/hf.yaml)."""
    values = model_fields(load_hf_config(path))
    if field not in values:
        raise ValueError(f"hf_config: unknown field {field!r}; expected one of {sorted(values)}")
    return values[field]


def register_hf_config_resolver() -> None:
    """Register the `hf_config` OmegaConf resolver (idempotent)."""
    if not OmegaConf.has_resolver("hf_config"):
        OmegaConf.register_new_resolver("hf_config", hf_config_value)


def hf_model_config(path: str | Path, **overrides) -> ModelConfig:
    """A `ModelConfig` for model=hf with the shapes of `path`/config.json (for use from Python;
    the Hydra config gets the same through the resolver). `overrides` set the other fields
    (dtype, attn_backend, kernel_backend)."""
    values = model_fields(load_hf_config(path))
    return ModelConfig(**{"name": "hf", "path": str(path), **values, **overrides})


def check_model_config(cfg: ModelConfig, config) -> None:
    """Raise ValueError when a shape field of `cfg` disagrees with config.json."""
    for name, value in model_fields(config).items():
        if getattr(cfg, name) != value:
            raise ValueError(
                f"model.{name}={getattr(cfg, name)!r} disagrees with {cfg.path}/config.json "
                f"({value!r}); with model=hf the shapes come from config.json: drop the override"
            )


def check_seq_len(cfg: ModelConfig, seq_len: int) -> None:
    """Refuse a run whose documents could exceed the model's sliding window: our varlen
    attention is full causal, which equals sliding-window attention only for documents of at
    most `sliding_window` tokens (documents are chunked to at most data.seq_len tokens)."""
    window = sliding_window(load_hf_config(cfg.path))
    if window is not None and seq_len > window:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds the sliding window ({window}) of {cfg.path}; "
            f"longtrain's attention is full causal: use data.seq_len<={window} or a model "
            "without a sliding window (sliding_window: null in config.json)"
        )


def sliding_window(config) -> int | None:
    """The attention window if any layer of `config` uses one, else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


__all__ = [
    "SUPPORTED_FAMILIES",
    "check_model_config",
    "check_seq_len",
    "hf_config_value",
    "hf_model_config",
    "load_hf_config",
    "model_fields",
    "register_hf_config_resolver",
    "sliding_window",
]
