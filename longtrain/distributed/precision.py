"""`model.dtype`: what precision each engine computes, keeps and reduces in.

`float32` and `float64` are exact paths: parameters, activations, gradients and optimizer
state all in that dtype, no casts anywhere. `bfloat16` means what it means in torchtitan and
ALST: bf16 compute, activations (the residual stream, the block inputs that activation
checkpointing keeps or offloads) and gathered weights, over float32 master weights, float32
gradient reductions and float32 optimizer state. Norms, softmax statistics, RoPE tables and
the loss accumulate in float32 inside the kernels (`kernels.precision.acc_dtype`).

How each engine gets there (`engine_casts_params` tells which way a run goes):

| engine                  | forward sees     | master / optimizer | gradient reduction      |
|-------------------------|------------------|--------------------|-------------------------|
| fsdp2 (world > 1)       | bf16 (gathered)  | fp32 shards        | fp32 reduce-scatter     |
| deepspeed               | bf16 module      | fp32 ZeRO master   | ZeRO (bf16 section)     |
| none (one process, or   | fp32 parameters, | fp32               | fp32 all_reduce         |
|   replicas)             | cast per op      |                    |   (replicas)            |

fsdp2: `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`; the sharded
parameters, their gradients and AdamW's state stay float32; inputs are not cast (the loss
weights stay float32). deepspeed: its `bf16` section casts the module to bf16 and keeps a
float32 master copy in the ZeRO optimizer (initialised from the bf16-rounded weights, as
DeepSpeed does), with gradients accumulated in float32 (`data_types.grad_accum_dtype`).
none: the parameters stay float32 and the step runs under `torch.autocast(bfloat16,
cache_enabled=False)`: each matmul casts the weight it reads, and nothing keeps a cast copy
of every layer's weights for the whole forward (autocast's cache would). Linear layers cast
inside the op and again in the backward (`cast_linear_weights_in_op`): autocast's own
linear saves its bf16 weight copy for the backward, a bf16 copy of the model in the
activations. The embedding's output is cast to bf16 (`cast_embedding_output`), so the
residual stream is bf16 here too.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kernels.linear import linear_cast_weight
from longtrain.errors import ConfigError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def master_dtype(model_dtype: str) -> torch.dtype:
    """The dtype of parameters, gradients and optimizer state: float64 for float64 runs,
    float32 otherwise (the master weights of bf16 runs)."""
    return torch.float64 if model_dtype == "float64" else torch.float32


def compute_dtype(model_dtype: str) -> torch.dtype:
    """The dtype matmuls, activations and gathered weights are in."""
    return COMPUTE_DTYPES[model_dtype]


def engine_casts_params(model_dtype: str, engine: str, world_size: int) -> bool:
    """Whether the sharding engine hands the forward bf16 parameters (fsdp2 over several
    ranks, deepspeed); otherwise a bf16 run autocasts over float32 parameters."""
    if model_dtype != "bfloat16":
        return False
    return engine == "deepspeed" or (engine == "fsdp2" and world_size > 1)


def uses_autocast(model_dtype: str, engine: str, world_size: int) -> bool:
    """Whether a step of this run runs under `torch.autocast` (bf16 without a casting engine)."""
    return model_dtype == "bfloat16" and not engine_casts_params(model_dtype, engine, world_size)


def describe_precision(model_dtype: str, engine: str, world_size: int) -> str:
    """One line for the run's start: what computes in which dtype, and by which mechanism."""
    if model_dtype != "bfloat16":
        return f"precision: {model_dtype} throughout (exact path)"
    how = (
        "FSDP2 gathers bf16, reduce-scatters fp32"
        if engine == "fsdp2" and world_size > 1
        else "DeepSpeed bf16, fp32 ZeRO master"
        if engine == "deepspeed"
        else "autocast, no weight cache"
    )
    return f"precision: bf16 compute and activations over fp32 master weights ({how})"


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast without its weight cache (see the module doc), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


def embedding_module(model: nn.Module) -> nn.Module:
    """The input embedding of our Transformer (`embed`) or of a Hugging Face model."""
    if isinstance(getattr(model, "embed", None), nn.Embedding):
        return model.embed
    hf = getattr(model, "hf", None)
    if hf is not None:
        return hf.get_input_embeddings()
    raise ValueError(f"{type(model).__name__} has no input embedding to cast")


def _cast_output_under_autocast(module, args, output):
    device_type = output.device.type
    if output.is_floating_point() and torch.is_autocast_enabled(device_type):
        return output.to(torch.get_autocast_dtype(device_type))
    return output


def cast_embedding_output(model: nn.Module) -> None:
    """Under autocast, hand the blocks the embedding in the autocast dtype (the embedding is
    no autocast op: it would start a float32 residual stream). A no-op outside autocast and
    when the engine already gathers bf16 weights."""
    embedding_module(model).register_forward_hook(_cast_output_under_autocast)


def _linear_forward_casting_in_op(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if module.weight.dtype != dtype:
            return linear_cast_weight(x, module.weight, module.bias, dtype)
    return nn.Linear.forward(module, x)


def cast_linear_weights_in_op(model: nn.Module) -> None:
    """Under autocast, every `nn.Linear` of the model casts its weight inside the op and
    again in the backward (`kernels.linear.linear_cast_weight`) instead of saving a cast
    copy; outside autocast, or when the weights already are in the autocast dtype (an engine
    gathered them in bf16), the plain `nn.Linear.forward`. Our model and Hugging Face models
    alike; in place."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = _linear_forward_casting_in_op.__get__(module)


def check_bf16_device(model_dtype: str, device: torch.device) -> None:
    """bf16 asked on a GPU without bf16 support: one line, before any work. (CPUs compute
    bf16 in software where they lack it.)"""
    if model_dtype != "bfloat16" or device.type != "cuda":
        return
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"model.dtype=bfloat16 but {name} has no bf16 support: use model.dtype=float32 "
            "(or a GPU of compute capability 8.0 or newer)"
        )


__all__ = [
    "autocast_context",
    "cast_embedding_output",
    "cast_linear_weights_in_op",
    "check_bf16_device",
    "compute_dtype",
    "describe_precision",
    "embedding_module",
    "engine_casts_params",
    "master_dtype",
    "uses_autocast",
]
