"""What the training engine holds per GPU besides the step's own allocations: parameters,
optimizer state, gradient storage and gather/reduce buffers, from the parameter shapes alone.

Legend: W ranks that shard the model (the whole world: dp x sp ranks hold the same weights),
b bytes per parameter element (4: float32 master weights, also under bf16 autocast; 8:
float64), P all parameters, S this rank's shard of them (per tensor: ceil(dim0 / W) x rest
for FSDP2, ceil(numel / W) for ZeRO), B the largest block, R the parameters outside the
blocks (embedding, final norm, output), O the output projection.

| engine              | parameters    | gradients (kept)  | optimizer          | communication  |
|---------------------|---------------|-------------------|--------------------|----------------|
| none                | P b           | full, as computed | 2 P b (AdamW m, v) | 0              |
| fsdp2               | S b + R b (1) | S b (2); R full   | 2 S b              | 4 B b (3)      |
| fsdp2 + cpu_offload | R b           | R full            | 0 (host)           | 4 B b          |
| zero1               | P b           | full, as computed | 2 S b + S 4 (4)    | B b (5)        |
| zero2               | P b           | S b               | 2 S b + S 4        | B b            |
| zero3               | S b + O b (6) | S b               | 2 S b + S 4        | 2 B b + B b (7)|

(1) FSDP2 keeps the root module's parameters gathered from its forward to the end of its
backward, and their gradients unsharded until the root's reduce-scatter. (2) each shard
appears when its block's gradients are reduce-scattered (the planner allocates it when the
gradient is accumulated). (3) in the backward: the current block gathered, the next one's
all-gather output (prefetch), the current block's unsharded gradients, and the previous
block's reduce-scatter input, which FSDP2 holds until the next reduce-scatter. (4) DeepSpeed
keeps a float32 master copy of its partition. (5) the gradient bucket, sized to one block
(`engines.deepspeed_engine.deepspeed_config`). (6) the output projection is an external
parameter of the root (gathered while the model runs). (7) at most two blocks of live
parameters plus the reduce bucket. `offload_optimizer` moves the optimizer column and the
S b gradients to the host; `offload_params` the S b parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from longtrain.config import RunConfig


@dataclass
class EngineState:
    """Bytes per GPU held by the engine for the whole step, and how gradients are kept."""

    engine: str  # none | fsdp2 | zero1 | zero2 | zero3
    parameters: int
    gradients: int  # constant gradient storage (shards); full gradients are tracked instead
    optimizer: int
    communication: int
    host: int  # bytes the engine keeps in host memory (offloaded state), per rank
    keep_full_grads: bool  # gradients stay full on the GPU as autograd makes them
    full_grad_params: set = field(default_factory=set)  # names whose full grads stay anyway
    grad_shards: dict = field(default_factory=dict)  # name -> shard numel made in the backward

    def constants(self) -> dict:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "communication": self.communication,
        }


def _shapes(model: nn.Module) -> tuple[dict, set, int, int]:
    """({name: shape}, names inside blocks, largest block numel, output weight numel)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    in_blocks = {n for n in shapes if n.startswith("layers.")}
    block = max((sum(p.numel() for p in layer.parameters()) for layer in model.layers), default=0)
    return shapes, in_blocks, block, model.output_weight().numel()


def _numel(shape) -> int:
    return math.prod(shape)


def engine_state(cfg: RunConfig, model: nn.Module, world_size: int) -> EngineState:
    """The engine's per-GPU memory for `model` trained as `cfg` says on `world_size` ranks."""
    b = 8 if cfg.model.dtype == "float64" else 4
    shapes, in_blocks, block, output = _shapes(model)
    P = sum(_numel(s) for s in shapes.values())
    root = {n for n in shapes if n not in in_blocks}
    R = sum(_numel(shapes[n]) for n in root)
    W = world_size
    engine = cfg.train.engine if world_size > 1 or cfg.train.engine == "deepspeed" else "none"
    if engine == "none":
        return EngineState("none", P * b, 0, 2 * P * b, 0, 0, keep_full_grads=True)
    if engine == "fsdp2":
        shards = {n: math.ceil(s[0] / W) * _numel(s[1:]) for n, s in shapes.items()}
        S = sum(shards.values())
        offload = cfg.train.memory.cpu_offload
        return EngineState(
            "fsdp2",
            parameters=(0 if offload else S * b) + R * b,
            gradients=0,
            optimizer=0 if offload else 2 * S * b,
            communication=4 * block * b,
            host=(S * b + S * b + 2 * S * b) if offload else 0,
            keep_full_grads=False,
            full_grad_params=root,
            grad_shards={} if offload else {n: k for n, k in shards.items() if n not in root},
        )
    if engine != "deepspeed":
        raise ValueError(f"train.engine={engine!r}; expected fsdp2, deepspeed or none")
    ds = cfg.train.deepspeed
    S = sum(math.ceil(_numel(s) / W) for s in shapes.values())
    optim = 2 * S * b + S * 4
    grads = S * b
    host = 0
    if ds.offload_optimizer:
        host += optim + grads
        optim, grads = 0, 0
    if ds.zero_stage == 1:
        return EngineState("zero1", P * b, 0, optim, block * b, host, keep_full_grads=True)
    if ds.zero_stage == 2:
        return EngineState("zero2", P * b, grads, optim, block * b, host, keep_full_grads=False)
    params = 0 if ds.offload_params else S * b
    host += S * b if ds.offload_params else 0
    return EngineState(
        "zero3", params + output * b, grads, optim, 3 * block * b, host, keep_full_grads=False
    )


__all__ = ["EngineState", "engine_state"]
