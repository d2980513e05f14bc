"""Start a run's model without ever holding all of it: build on the meta device, apply the
parallel plan and FSDP2's sharding there, then give storage only to this rank's shards and
fill them from the seed (torchtitan's order: meta model -> parallelise -> `to_empty` ->
`init_weights`).

The weights depend on the seed alone: `Transformer.init_weights` draws each full tensor in
the order of one process and keeps this rank's shard of it, so every layout starts from the
same full model. A rank's host memory at start-up is its shards plus one full tensor, where
building first and sharding after held the whole model on every rank.

model=hf starts the same way, its safetensors weights read straight into the shards
(`longtrain.model.hf_shards`: each rank reads only its rows), or without weights its own
init drawn module by module from the seed. model=hf with `.bin` weights (a pickle, read
whole) and DeepSpeed runs (ZeRO partitions a model it is handed whole) are built whole,
then parallelised.
"""

from __future__ import annotations

import torch
from torch import nn

from longtrain.config import RunConfig
from longtrain.distributed.env import DistEnv
from longtrain.distributed.parallelize import parallelize
from longtrain.model import build_model
from longtrain.model.hf import has_weights
from longtrain.model.hf_shards import has_safetensors, init_hf_shards, load_hf_shards
from longtrain.model.sharded_init import materialize_storage


def starts_on_meta(cfg: RunConfig) -> bool:
    """Whether this run's model is built on the meta device: our model, or model=hf with
    safetensors weights or none (a random init), on any engine but DeepSpeed."""
    if cfg.train.engine == "deepspeed":
        return False
    path = cfg.model.path
    return cfg.model.name != "hf" or has_safetensors(path) or not has_weights(path)


def materialize_device(cfg: RunConfig, env: DistEnv) -> torch.device:
    """Where the parameters get their storage: the host for FSDP2's CPU offload (its shards
    live there), else the run's device."""
    if cfg.train.engine == "fsdp2" and cfg.train.memory.cpu_offload and env.world_size > 1:
        return torch.device("cpu")
    return env.device


def build_parallel_model(cfg: RunConfig, env: DistEnv, dims, pad_id: int):
    """The run's model, parallelised and initialised from `cfg.train.seed`; returns (model,
    StepContext) as `parallelize` does."""
    if not starts_on_meta(cfg):
        model = build_model(cfg.model, seed=cfg.train.seed, device=env.device)
        return parallelize(model, dims, cfg, env, pad_id=pad_id)
    model = build_model(cfg.model, seed=cfg.train.seed, device="meta")
    model, ctx = parallelize(model, dims, cfg, env, pad_id=pad_id)
    materialize(model, cfg, materialize_device(cfg, env))
    return model, ctx


def materialize(model: nn.Module, cfg: RunConfig, device: torch.device) -> None:
    """Storage on `device` for every (sharded) parameter of a meta `model`, then its
    values: the seeded init (our model) or the Hugging Face weights (model=hf), in place.
    Buffers (computed when the model was built) keep their values."""
    materialize_storage(model, device)
    if cfg.model.name == "hf" and has_safetensors(cfg.model.path):
        load_hf_shards(model, cfg.model.path)
    elif cfg.model.name == "hf":
        init_hf_shards(model.hf, cfg.train.seed)
    else:
        model.init_weights(cfg.train.seed)


__all__ = ["build_parallel_model", "materialize", "materialize_device", "starts_on_meta"]
