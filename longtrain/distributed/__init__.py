"""Processes and parallelism, applied to a model from outside.

env.py           process group and this rank's device (torchrun's environment, read once)
parallelize.py   the fixed order: sequence parallel -> memory stack -> compile -> engine
fsdp2.py         FSDP2 over every rank;  deepspeed_zero.py  DeepSpeed ZeRO 1/2/3
memory/          tiled MLP, activation checkpointing and offload
context.py       StepContext: what a step needs besides the model (groups, numerics)
"""

from longtrain.distributed.env import (
    DistEnv,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
    single_process_env,
)

__all__ = [
    "DistEnv",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_distributed",
    "shutdown",
    "single_process_env",
]
