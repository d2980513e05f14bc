"""Deterministic, resumable loader of packed batches, sharded over data-parallel ranks.

The sequence stream is a pure function of (seed, step): epoch e visits the packing's
sequences in the order `permutation(seed, e)`, and optimizer step k takes the next
`global_batch` of them, rank r of the data-parallel group taking its contiguous share.
Its state is therefore just the next step, and a resume is bitwise exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longtrain.data.batch import PackedBatch, build_batch
from longtrain.data.packing import Packing


@dataclass
class StepBatches:
    step: int
    micro_batches: list[PackedBatch]  # this rank's share, split into micro-batches


class PackedLoader:
    """Yields `StepBatches` for steps `start_step, start_step + 1, ...`."""

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        packing: Packing,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        pad_id: int,
    ) -> None:
        if global_batch % dp_size:
            raise ValueError(
                f"train.global_batch ({global_batch}) must be divisible by the data-parallel "
                f"size ({dp_size}); use a multiple of {dp_size}"
            )
        local = global_batch // dp_size
        micro_batch = micro_batch or local
        if local % micro_batch:
            raise ValueError(
                f"train.micro_batch ({micro_batch}) must divide the per-rank batch ({local} = "
                f"global_batch {global_batch} / dp {dp_size})"
            )
        if packing.num_sequences == 0:
            raise ValueError("the packing has no sequences: is the corpus empty?")
        self.tokens, self.offsets, self.packing = tokens, offsets, packing
        self.global_batch, self.micro_batch, self.local_batch = global_batch, micro_batch, local
        self.dp_rank, self.seed, self.shuffle, self.pad_id = dp_rank, seed, shuffle, pad_id
        self.next_step = 0
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = self.packing.num_sequences
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def global_sequence_ids(self, step: int) -> np.ndarray:
        """The `global_batch` sequence ids of optimizer step `step` (all ranks)."""
        n = self.packing.num_sequences
        stream = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        return np.array([self._epoch_order(int(i // n))[i % n] for i in stream], dtype=np.int64)

    def batches_for_step(self, step: int) -> StepBatches:
        ids = self.global_sequence_ids(step)
        mine = ids[self.dp_rank * self.local_batch : (self.dp_rank + 1) * self.local_batch]
        micro = [
            build_batch(
                self.tokens, self.offsets, self.packing, mine[i : i + self.micro_batch], self.pad_id
            )
            for i in range(0, self.local_batch, self.micro_batch)
        ]
        return StepBatches(step=step, micro_batches=micro)

    def __iter__(self):
        while True:
            batches = self.batches_for_step(self.next_step)
            self.next_step += 1
            yield batches

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"checkpoint data seed {state['seed']} differs from train.seed {self.seed}"
            )
        self.next_step = int(state["next_step"])
