"""The memory stack for long sequences: tiled MLP, activation checkpointing (full or
selective) with offload of the checkpointed block inputs, applied from outside the model by
`apply_memory(model, train.memory)`."""

from longtrain.distributed.memory.apply import apply_memory
from longtrain.distributed.memory.checkpointing import ActivationOffloader, checkpoint_block
from longtrain.distributed.memory.tiled_mlp import num_mlp_tiles, tile_mlp, tiled_apply

__all__ = [
    "ActivationOffloader",
    "apply_memory",
    "checkpoint_block",
    "num_mlp_tiles",
    "tile_mlp",
    "tiled_apply",
]
