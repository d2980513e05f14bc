"""FSDP2 over every rank (step 4 of `longtrain.distributed.parallelize`).

dp x sp ranks all hold replicas of the same weights, so one mesh over the whole world shards
them; each block is its own FSDP unit, the root holds the rest (embedding, final norm, output).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from longtrain.distributed.env import DistEnv


def apply_fsdp2(
    model: nn.Module, env: DistEnv, cpu_offload: bool = False, model_dtype: str = "float32"
) -> None:
    """Shard `model` (its `layers`, then the root) over all `env.world_size` ranks, in place;
    `cpu_offload` keeps parameters, gradients and optimizer state on the host.

    model_dtype=bfloat16: the float32 shards are all-gathered as bf16 for the forward and
    backward, and gradients reduce-scatter in float32 into float32 shards
    (`longtrain.distributed.precision`); float32 / float64 run in the parameters' dtype."""
    mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("fsdp",))
    bf16 = model_dtype == "bfloat16"
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        # Inputs as they come: token ids, and loss weights that must stay float32 (1/N_i).
        cast_forward_inputs=False,
    )
    # cpu_offload: sharded parameters, gradients and optimizer state live on the host.
    offload = (
        CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if cpu_offload else OffloadPolicy()
    )
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The loss is already divided by the global token count: sum, do not average.
            # Plain SUM also keeps gloo working (it has no PREMUL_SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


__all__ = ["apply_fsdp2"]
