"""Seeded init into sharded parameters without a full copy of any of them.

A parameter's full values are drawn from one generator in row chunks (`normal_rows`); a
rank keeps the rows of its shard (`copy_rows_into`) and drops the rest. torch's CPU
`randn` fills a tensor from uniform draws in order, then turns each group of 16 into
normals; so chunks whose sizes are multiples of 16 give the same values, and leave the
generator in the same state, as one call for the whole tensor (tests/model/test_init.py
holds torch to that). A tensor whose size is not a multiple of 16 is drawn in one call.

Shards are FSDP2's: a DTensor with placements (Shard(0),) on a 1-D mesh holds rows
[i * ceil(n / W), ...) of n, as `torch.chunk` splits them. Other placements are filled from
the whole tensor (`distribute_tensor`, sliced locally).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per draw


def normal_rows(
    gen: torch.Generator, shape: torch.Size, scale: float, chunk_elements: int = CHUNK_ELEMENTS
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows) of `torch.randn(shape, generator=gen) * scale`, in order."""
    rows, row = shape[0], math.prod(shape[1:])
    numel = rows * row
    step = rows
    if numel % 16 == 0 and numel > chunk_elements:
        unit = 16 // math.gcd(row, 16)  # rows per multiple of 16 elements
        step = max(unit, chunk_elements // row // unit * unit)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        yield start, torch.randn((n, *shape[1:]), generator=gen).mul_(scale)


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """[start, stop) of dim 0 this rank holds of `param`: all of a plain tensor, the
    `torch.chunk` share of a dim-0 sharded DTensor; None for other placements."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or tuple(placements) != (Shard(0),):
        return None
    rows = param.shape[0]
    per = math.ceil(rows / mesh.size())
    start = min(rows, mesh.get_local_rank() * per)
    return start, min(rows, start + per)


def copy_rows_into(param: torch.Tensor, first_row: int, rows: torch.Tensor) -> None:
    """Copy full rows [first_row, first_row + len(rows)) into the part of `param` this rank
    holds (`local_rows` must not be None)."""
    from torch.distributed.tensor import DTensor

    start, stop = local_rows(param)
    local = param.to_local() if isinstance(param, DTensor) else param
    lo, hi = max(start, first_row), min(stop, first_row + rows.shape[0])
    if lo < hi:
        local[lo - start : hi - start].copy_(rows[lo - first_row : hi - first_row])


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor `full` into `param`: all of it, or this rank's part of a DTensor
    (sliced locally, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if local_rows(param) is not None:
        copy_rows_into(param, 0, full)
    elif isinstance(param, DTensor):
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())


def materialize_storage(model: nn.Module, device: torch.device | str) -> None:
    """Give every parameter of a meta-device `model` (possibly sharded) uninitialised storage
    on `device`, in place. Buffers (computed when the model was built) keep their values;
    parameters shared by several modules (a tied embedding and output projection) stay one
    object: `to_empty` alone would give each module a new one."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, name))
    model.to_empty(device=device)
    for (first, first_name), *others in owners.values():
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


__all__ = [
    "copy_full_into",
    "copy_rows_into",
    "local_rows",
    "materialize_storage",
    "normal_rows",
]
