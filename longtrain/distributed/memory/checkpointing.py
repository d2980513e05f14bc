"""Activation checkpointing per block (full or selective) and offload of the checkpointed block
inputs to host memory.

Legend: T tokens on this rank, D model width.

- full: a block keeps only its inputs (x_TD and position_ids_T); its backward recomputes the
  whole block first (`torch.utils.checkpoint`, non-reentrant).
- selective: the same, but the outputs of the attention kernels are kept, so the recompute
  runs the projections, norms and MLP again and never the attention itself (the costly
  O(T^2) part). Ops are recognised by name (`ATTENTION_OPS`): the torch backend's CPU flash
  op, the triton / flash-attn ops and the custom op used under torch.compile.
- offload: the block inputs that checkpointing keeps (the only activations it keeps, besides
  the attention outputs of selective) wait in host memory. Non-reentrant checkpointing saves
  them as saved tensors, so `torch.autograd.graph.saved_tensors_hooks` around the
  checkpointed call sees exactly them. On CUDA the device-to-host copy runs on a side stream
  into pinned memory (overlapping the next blocks' forward), and in the backward the inputs
  of the block before are prefetched on that stream while the current block recomputes.
  Elsewhere (CPU) the same hooks copy synchronously.

Blocks are changed in place by swapping their class for a subclass (as `fully_shard` does):
parameter names and state dicts stay those of the plain model, so checkpoints move freely
between memory settings.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from longtrain.distributed.memory.mixin import mix_into
from longtrain.torch_private import TorchDispatchMode

# Attention forward ops whose outputs selective checkpointing keeps, by qualified name.
ATTENTION_OPS = frozenset(
    {
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
        "flash_attn::_flash_attn_varlen_forward",
        "flash_attn::_flash_attn_forward",
        "longtrain::attn_varlen_fwd",
        "longtrain::triton_attn_fwd",
    }
)


def _op_name(func) -> str:
    schema = getattr(func, "_schema", None)
    return schema.name if schema is not None else str(func)


def _keep_attention(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if _op_name(func) in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _CloneAttentionOutputs(TorchDispatchMode):
    """Hand the program a copy of each attention op's outputs, so that what checkpointing
    keeps is never changed in place (ring attention merges later blocks into the first
    block's output); the recompute then gets fresh copies of the kept originals."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _op_name(func) not in ATTENTION_OPS:
            return out
        if isinstance(out, torch.Tensor):
            return out.clone()
        return type(out)(t.clone() if isinstance(t, torch.Tensor) else t for t in out)


class _Nested:
    """Enter `outer` then `inner` (inner sees each op first), exit in reverse."""

    def __init__(self, outer, inner):
        self.outer, self.inner = outer, inner

    def __enter__(self):
        self.outer.__enter__()
        self.inner.__enter__()

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)
        return self.outer.__exit__(*exc)


def selective_contexts():
    """The (forward, recompute) contexts of selective checkpointing: keep attention outputs."""
    forward, recompute = create_selective_checkpoint_contexts(_keep_attention)
    return _Nested(forward, _CloneAttentionOutputs()), _Nested(recompute, _CloneAttentionOutputs())


# ----------------------------------------------------------------------------------------------
# Offload of saved block inputs
# ----------------------------------------------------------------------------------------------


PIECE_MIN_BYTES = 1 << 20  # the smallest pinned piece of an offloaded tensor


def pinned_pieces(nbytes: int) -> list[int]:
    """Sizes of the pinned host buffers an offloaded tensor of `nbytes` is copied into on
    CUDA: powers of two, largest first, summing to `nbytes` rounded up to PIECE_MIN_BYTES.

    torch's caching host allocator rounds every pinned request up to a power of two (and
    keeps the block for the next step): one buffer per tensor would pin up to twice its
    size (a 5 GiB block input, 8 GiB). Requests that are powers of two are taken as they
    are, so the binary digits of the size waste at most one MiB per tensor."""
    if nbytes <= 0:
        return []
    if nbytes <= PIECE_MIN_BYTES:
        return [1 << (nbytes - 1).bit_length()]
    total = -(-nbytes // PIECE_MIN_BYTES) * PIECE_MIN_BYTES
    return [1 << b for b in reversed(range(total.bit_length())) if total >> b & 1]


def pinned_host_bytes(nbytes: int) -> int:
    """Host memory one offloaded tensor of `nbytes` pins in a CUDA run (`pinned_pieces`)."""
    return sum(pinned_pieces(nbytes))


def to_pieces(t: torch.Tensor, pin: bool = True) -> list[torch.Tensor]:
    """Copy the bytes of `t` (contiguous) into new host buffers of `pinned_pieces` sizes
    (non-blocking: run it on the stream that may read `t`)."""
    bytes_B = t.reshape(-1).view(torch.uint8)
    pieces, start = [], 0
    for size in pinned_pieces(bytes_B.numel()):
        piece = torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=pin)
        n = min(size, bytes_B.numel() - start)
        piece[:n].copy_(bytes_B[start : start + n], non_blocking=pin)
        pieces.append(piece)
        start += n
    return pieces


def from_pieces(
    pieces: list[torch.Tensor], like: torch.Tensor, device: torch.device, non_blocking: bool
) -> torch.Tensor:
    """A new tensor on `device` with the shape and dtype of `like`, from `to_pieces` bytes."""
    nbytes = like.numel() * like.element_size()
    bytes_B = torch.empty(nbytes, dtype=torch.uint8, device=device)
    start = 0
    for piece in pieces:
        n = min(piece.numel(), nbytes - start)
        bytes_B[start : start + n].copy_(piece[:n], non_blocking=non_blocking)
        start += n
    return bytes_B.view(like.dtype).view(like.shape)


@dataclass(eq=False)
class _Offloaded:
    """One saved tensor waiting in host memory: a copy (CPU, meta), or its bytes in pinned
    pieces (CUDA) with `like` (a meta tensor) keeping its shape and dtype."""

    host: torch.Tensor | list
    device: torch.device
    group: int  # which checkpointed call packed it (prefetch works group by group)
    like: torch.Tensor | None = None  # CUDA: the shape and dtype of the pieces' tensor
    d2h_done: object = None  # torch.cuda.Event on the side stream, CUDA only
    on_device: torch.Tensor | None = None  # prefetched copy back
    h2d_done: object = None


@dataclass
class ActivationOffloader:
    """saved_tensors_hooks that move saved tensors to `host_device` and back.

    host_device: "cpu" (pinned pieces, `pinned_pieces`, when the tensors are on CUDA) in
    training; the planner passes "meta" so that offloaded tensors leave the simulated
    device without being allocated.
    """

    host_device: str = "cpu"
    _group: int = 0
    _pending: dict = field(default_factory=dict)  # group -> weak list of records
    _streams: dict = field(default_factory=dict)  # CUDA device -> side stream

    @contextlib.contextmanager
    def hooks(self):
        """Offload every tensor saved inside this context (one group per entry)."""
        for group in [g for g, records in self._pending.items() if not records]:
            del self._pending[group]  # groups whose graph died without a backward
        self._group += 1
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _side_stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _cuda(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda" and torch.cuda.is_available()

    def _pack(self, t: torch.Tensor) -> _Offloaded:
        host_device = torch.device(self.host_device)
        if self._cuda(t) and host_device.type == "cpu":
            stream = self._side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                pieces = to_pieces(t.contiguous(), pin=True)
                done = torch.cuda.Event()
                done.record(stream)
            t.record_stream(stream)  # t's memory is not reused before the copy has read it
            like = torch.empty(t.shape, dtype=t.dtype, device="meta")
            record = _Offloaded(pieces, t.device, self._group, like=like, d2h_done=done)
        else:
            record = _Offloaded(t.to(host_device, copy=True), t.device, self._group)
        self._pending.setdefault(self._group, weakref.WeakSet()).add(record)
        return record

    def _fetch(self, record: _Offloaded) -> None:
        """Start copying `record` back to its device (side stream on CUDA)."""
        if record.on_device is not None:
            return
        if record.d2h_done is None:
            record.on_device = record.host.to(record.device)
            return
        stream = self._side_stream(record.device)
        with torch.cuda.stream(stream):
            stream.wait_event(record.d2h_done)
            record.on_device = from_pieces(record.host, record.like, record.device, True)
            record.h2d_done = torch.cuda.Event()
            record.h2d_done.record(stream)

    def _unpack(self, record: _Offloaded) -> torch.Tensor:
        self._fetch(record)
        if record.h2d_done is not None:
            current = torch.cuda.current_stream(record.device)
            current.wait_event(record.h2d_done)
            record.on_device.record_stream(current)
        # The backward runs blocks in reverse: prefetch the inputs of the block before.
        for other in list(self._pending.get(record.group - 1, ())):
            self._fetch(other)
        self._pending.pop(record.group, None)
        out, record.on_device = record.on_device, None
        return out


# ----------------------------------------------------------------------------------------------
# Checkpointed blocks
# ----------------------------------------------------------------------------------------------


class CheckpointedBlockMixin:
    """Mixed into a block's class by `checkpoint_block`: forward(*args, **kwargs) runs
    checkpointed. Offload moves the positional tensor inputs (what checkpointing saves);
    keyword tensors are held by the recomputation as they are."""

    _ac_mode: str = "full"
    _offloader: ActivationOffloader | None = None

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        context_fn = selective_contexts if self._ac_mode == "selective" else _no_contexts
        offload = self._offloader.hooks() if self._offloader is not None else _null()
        with offload:
            return checkpoint(
                super().forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs
            )


def _no_contexts():
    return contextlib.nullcontext(), contextlib.nullcontext()


def _null():
    return contextlib.nullcontext()


def checkpoint_block(
    block: nn.Module, mode: str, offloader: ActivationOffloader | None = None
) -> nn.Module:
    """Checkpoint `block` in place (mode full | selective), optionally offloading its saved
    inputs with `offloader` (its positional tensor inputs: pass the activations positionally)."""
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpoint mode {mode!r}; expected full or selective")
    mix_into(block, CheckpointedBlockMixin, "Checkpointed")
    block._ac_mode = mode
    block._offloader = offloader
    return block


__all__ = [
    "ATTENTION_OPS",
    "ActivationOffloader",
    "CheckpointedBlockMixin",
    "checkpoint_block",
    "from_pieces",
    "pinned_host_bytes",
    "pinned_pieces",
    "selective_contexts",
    "to_pieces",
]
