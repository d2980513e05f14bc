"""Every private PyTorch API that longtrain uses for planning and memory accounting, in one
place, so that a torch upgrade touches this file only.

- `TorchDispatchMode` (torch.utils._python_dispatch): see every op with its outputs.
- `FakeTensorMode` (torch._subclasses.fake_tensor): tensors with shapes and no memory.
- the "fake" process-group backend with `FakeStore`
  (torch.testing._internal.distributed.fake_pg): collectives that return at once, at any
  world size, in one process.
- `torch.compiler._is_compiling_flag`: our kernels run their custom ops (with fake
  implementations) when `torch.compiler.is_compiling()`; the planner raises the flag so that
  fake tensors take that path instead of the eager one (whose checks read tensor values).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "FakeTensorMode",
    "TorchDispatchMode",
    "fake_mode",
    "fake_process_group",
    "is_fake",
    "kernels_compile_path",
]


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def fake_mode() -> FakeTensorMode:
    """A mode (enter it as often as needed) inside which new tensors are fake: shape, dtype,
    device, no storage. Real tensors made outside (token ids, document boundaries) may be
    inputs."""
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """A default process group of `world_size` ranks in this one process, as `rank`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "planning needs its own fake process group, but torch.distributed is already "
            "initialised in this process; run the planner in a fresh process"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def kernels_compile_path() -> Iterator[None]:
    """Make `torch.compiler.is_compiling()` true, so kernels dispatch to their custom ops."""
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous
