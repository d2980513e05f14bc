"""What the training engine holds per GPU besides the step's own allocations: parameters,
optimizer state, gradient storage and gather/reduce buffers, from the parameter shapes alone;
and what it keeps in host memory.

Legend: W ranks that shard the model (the whole world: dp x sp ranks hold the same weights),
m bytes of a master element (4: float32, the master weights of bf16 runs too; 8: float64),
c bytes of an element of the weights the forward sees (2 when the engine casts them to bf16,
`precision.engine_casts_params`; else m), P all parameters, S this rank's shard of them (per
tensor: ceil(dim0 / W) x rest for FSDP2, ceil(numel / W) for ZeRO), B the largest block, R
the parameters outside the blocks (embedding, final norm, output), O the output projection.

| engine              | parameters    | gradients (kept)  | optimizer       | communication   |
|---------------------|---------------|-------------------|-----------------|-----------------|
| none                | P m           | full, as computed | 2 P m (m, v)    | 0               |
| fsdp2               | S m + R c (1) | S m (2); R full   | 2 S m           | in time (3)     |
| fsdp2 + cpu_offload | R c           | R full            | 0 (host)        | in time (3)     |
| zero1               | P c           | full (+ P 4) (4)  | 2 S m + S 4 (5) | B c (6)         |
| zero2               | P c           | S g (7)           | 2 S m + S 4     | B c             |
| zero3               | S c + O c (8) | S g               | 2 S m + S 4     | 2 B c + B c (9) |

(1) FSDP2 keeps the root module's parameters gathered (in the compute dtype) from its
forward to the end of its backward, and their gradients unsharded until the root's
reduce-scatter. (2) each float32 shard appears when its block's gradients are
reduce-scattered (the planner makes them when the block's backward ends). (3) allocated by
the planner when FSDP2 holds them (`gather` = B c, `reduce` = B m): in the forward the
block gathered and the next one's all-gather (prefetch); in the backward the block gathered,
the one before it prefetched, the block's unsharded gradients (tracked as autograd makes
them), and the previous block's reduce-scatter input, held until the next reduce-scatter (m:
bf16 runs reduce in float32): at most 3 B c + B m. (4) bf16:
ZeRO-1 accumulates in a float32 buffer of every parameter (`data_types.grad_accum_dtype`).
(5) DeepSpeed keeps a float32 master copy of its partition. (6) the gradient bucket, sized
to one block (`distributed.deepspeed_zero.deepspeed_config`). (7) g = 4 for bf16 (float32
gradient partition) and m otherwise. (8) the output projection is an external parameter of
the root (gathered while the model runs). (9) at most two blocks of live parameters plus
the reduce bucket.

Host memory per GPU (`host`): FSDP2's cpu_offload keeps the shards, their gradients and
AdamW's state there (4 S m); DeepSpeed's `offload_optimizer` moves the optimizer column and
the gradient partition (2 S m + S 4 + S g, float32 for bf16 runs), `offload_params` the
S c parameter partitions. Offloaded activations are the planner's (`simulate`), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from longtrain.config import RunConfig
from longtrain.distributed.precision import engine_casts_params


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
    # FSDP2's per-block buffers, which the planner allocates at the times FSDP2 holds them
    # (`simulate`): one block all-gathered, in the compute dtype, and one block's
    # reduce-scatter input, in the reduce dtype; bytes.
    gather: int = 0
    reduce: int = 0
    host_parts: dict = field(default_factory=dict)  # what `host` is made of, bytes

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


def engine_name(cfg: RunConfig, world_size: int) -> str:
    """none | fsdp2 | deepspeed: what trains `cfg` on `world_size` ranks (FSDP2 needs two)."""
    if world_size > 1 or cfg.train.engine == "deepspeed":
        return cfg.train.engine
    return "none"


def engine_state(cfg: RunConfig, model: nn.Module, world_size: int) -> EngineState:
    """The engine's per-GPU memory for `model` trained as `cfg` says on `world_size` ranks."""
    m = 8 if cfg.model.dtype == "float64" else 4
    bf16 = engine_casts_params(cfg.model.dtype, cfg.train.engine, world_size)
    c = 2 if bf16 else m
    shapes, in_blocks, block, output = _shapes(model)
    P = sum(_numel(s) for s in shapes.values())
    root = {n for n in shapes if n not in in_blocks}
    R = sum(_numel(shapes[n]) for n in root)
    W = world_size
    engine = engine_name(cfg, world_size)
    if engine == "none":
        return EngineState("none", P * m, 0, 2 * P * m, 0, 0, keep_full_grads=True)
    if engine == "fsdp2":
        shards = {n: math.ceil(s[0] / W) * _numel(s[1:]) for n, s in shapes.items()}
        S = sum(shards.values())
        offload = cfg.train.memory.cpu_offload
        host = {"fsdp2 cpu_offload": 4 * S * m} if offload else {}  # shards, grads, AdamW
        return EngineState(
            "fsdp2",
            parameters=(0 if offload else S * m) + R * c,
            gradients=0,
            optimizer=0 if offload else 2 * S * m,
            communication=0,  # in time: `gather` and `reduce`, up to 3 B c + B m at once
            host=sum(host.values()),
            keep_full_grads=False,
            full_grad_params=root,
            grad_shards={} if offload else {n: k for n, k in shards.items() if n not in root},
            host_parts=host,
            gather=block * c,
            reduce=block * m,
        )
    if engine != "deepspeed":
        raise ValueError(f"train.engine={engine!r}; expected fsdp2, deepspeed or none")
    ds = cfg.train.deepspeed
    S = sum(math.ceil(_numel(s) / W) for s in shapes.values())
    g = 4 if bf16 else m  # the gradient partition: float32 under bf16
    optim = 2 * S * m + S * 4
    grads = S * g
    host = {}
    if ds.offload_optimizer:
        host["optimizer offload"] = optim + grads  # fp32 master, AdamW, gradient partition
        optim, grads = 0, 0
    if ds.zero_stage == 1:
        # bf16 without optimizer offload: the float32 accumulation buffer of every parameter.
        accum = P * 4 if bf16 and not ds.offload_optimizer else 0
        comm = block * c
        return EngineState(
            "zero1", P * c, accum, optim, comm, sum(host.values()), True, host_parts=host
        )
    if ds.zero_stage == 2:
        comm = block * c
        return EngineState(
            "zero2", P * c, grads, optim, comm, sum(host.values()), False, host_parts=host
        )
    params = 0 if ds.offload_params else S * c
    if ds.offload_params:
        host["parameter offload"] = S * c
    return EngineState(
        "zero3", params + output * c, grads, optim, 3 * block * c, sum(host.values()),
        keep_full_grads=False, host_parts=host,
    )  # fmt: skip


__all__ = ["EngineState", "engine_name", "engine_state"]
