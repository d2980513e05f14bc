"""The decoder model and its FLOP accounting."""

import torch

from longtrain.config import ModelConfig
from longtrain.model.flops import causal_pairs, param_count, train_flops
from longtrain.model.hf import HFCausalLM, build_hf_model
from longtrain.model.llama import Transformer, validate_model_config

__all__ = [
    "HFCausalLM",
    "Transformer",
    "build_model",
    "causal_pairs",
    "param_count",
    "train_flops",
    "validate_model_config",
]


def build_model(
    cfg: ModelConfig, seed: int, device: torch.device | str = "cpu"
) -> Transformer | HFCausalLM:
    """Build and deterministically initialise the model (weights identical on every rank).

    Parameters are the master weights: float32 for bfloat16 runs (the engine or autocast
    computes in bf16: longtrain.distributed.precision), float64 for float64 runs.
    `cfg.name == "hf"`: the Hugging Face model of `cfg.path`
    (see longtrain.model.hf). `device="meta"` (our model): the structure without storage,
    to be parallelised and sharded, then materialised with `to_empty` and `init_weights`.
    """
    if cfg.name == "hf":
        return build_hf_model(cfg, seed, device)
    param_dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    if torch.device(device).type == "meta":  # structure only: `init_weights(seed)` later
        with torch.device("meta"):
            return Transformer(cfg).to(dtype=param_dtype)
    model = Transformer(cfg)
    model.init_weights(seed)
    return model.to(device=device, dtype=param_dtype)
