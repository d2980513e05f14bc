"""Live tensor memory by category, op by op, for one simulated training step.

`MemoryTracker` is a dispatch mode placed above the fake-tensor mode: every op's outputs
that own a new storage on the planned device add their bytes to the category in force
(`phase`), and leave when Python drops the storage. At every new high it records the
breakdown, so the peak comes with what it is made of.

Categories (bytes per GPU): parameters, gradients, optimizer, activations (saved tensors and
temporaries of the model), communication (buffers that a collective reads or writes,
engine gather/reduce buffers), loss (everything the tiled loss allocates, forward and
backward). Parameters, optimizer state and engine buffers are constants added by the
planner (`engine_state`); the tracker sees the step's allocations only.

Kernel workspaces that fake implementations do not allocate (a loss tile of logits, the
flash-attention backward's float32 dq accumulator) are added while their op runs, by
`workspace_rules`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from longtrain.torch_private import TorchDispatchMode

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "communication", "loss")
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")

# (op, args, kwargs) -> transient bytes the real kernel needs beyond its outputs
WorkspaceRule = Callable[[object, tuple, dict], int]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class MemoryTracker(TorchDispatchMode):
    """Counts storages of tensors on `device` created while active (see the module doc)."""

    def __init__(
        self,
        device: torch.device,
        workspace_rules: dict | None = None,
        size_of: Callable[[int], int] | None = None,
    ) -> None:
        """`size_of`: bytes a storage of n bytes really takes (e.g. a pinned host buffer
        rounded up by its allocator); default n."""
        super().__init__()
        self.device = torch.device(device)
        self.rules: dict[str, WorkspaceRule] = dict(workspace_rules or {})
        self.size_of = size_of
        self.phase = "activations"
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, category, weakref]
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_breakdown = dict(self.by_category)
        self.peak_phase = ""
        self.label = ""  # position in the step (forward, loss forward, ...), set by the caller
        self.label_peaks: dict[str, tuple[int, dict]] = {}  # label -> (high, breakdown)

    # ------------------------------------------------------------------ bookkeeping
    def _add(self, t: torch.Tensor, category: str) -> None:
        if t.device != self.device:
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        nbytes = storage.nbytes() if self.size_of is None else self.size_of(storage.nbytes())
        self.live[key] = [nbytes, category, weakref.ref(storage, lambda _, k=key: self._drop(k))]
        self.by_category[category] += nbytes
        self.total += nbytes
        self._check_peak(0, category)

    def _drop(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.by_category[entry[1]] -= entry[0]
            self.total -= entry[0]

    def relabel(self, t: torch.Tensor, category: str) -> None:
        """Count the storage of `t` under `category` from now on (if the step allocated it)."""
        if t.device != self.device:
            return
        entry = self.live.get(id(t.untyped_storage()))
        if entry is None:
            return
        self.by_category[entry[1]] -= entry[0]
        self.by_category[category] += entry[0]
        entry[1] = category

    def _check_peak(self, extra: int, category: str) -> None:
        now = self.total + extra
        label = self.label or self.phase
        if now > self.label_peaks.get(label, (-1, None))[0]:
            breakdown = dict(self.by_category)
            breakdown[category] += extra
            self.label_peaks[label] = (now, breakdown)
            if now > self.peak:
                self.peak, self.peak_breakdown, self.peak_phase = now, breakdown, label

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        rule = self.rules.get(name)
        if rule is not None:
            self._check_peak(rule(func, args, kwargs), self.phase)
        out = func(*args, **kwargs)
        inputs = _tensors(args) + _tensors(list(kwargs.values()))
        collective = func.namespace in COLLECTIVE_NAMESPACES
        if collective:  # in-place collectives write into their arguments
            for t in inputs:
                self.relabel(t, "communication")
        # Views and in-place results share an input's storage: not an allocation (a view of
        # a parameter must not count the parameter).
        seen = {id(t.untyped_storage()) for t in inputs}
        for t in _tensors(out):
            if id(t.untyped_storage()) not in seen:
                self._add(t, "communication" if collective else self.phase)
        return out


__all__ = ["CATEGORIES", "MemoryTracker", "WorkspaceRule"]
