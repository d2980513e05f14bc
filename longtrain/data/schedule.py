"""What each optimizer step reads: a pure function of (config, seed, step).

Legend: S sequences of a step (all data-parallel ranks), L tokens per sequence that step.

Three schedules share one method, `plan(step) -> StepPlan`:

- `FixedLengthSchedule`: one packing at one seq_len; epoch e visits its sequences in a seeded
  permutation, step k takes the next `global_batch`.
- `DecompositionSchedule`: dataset decomposition (Pouransari et al. 2024): each step reads one
  bucket of 2^i-token chunks, `tokens_per_step / 2^i` of them, the bucket drawn by a length
  curriculum (`variable_length_schedule`); the schedule repeats per epoch with fresh chunk order.
- `StagedSchedule`: a list of stages (steps, seq_len, RoPE theta, global batch), each a fixed-
  length schedule of its own packing (GrowLength / LWM / ProLong style context extension).

Because a plan depends on nothing but the step, a resumed run reads exactly what an
uninterrupted one would, whatever the number of ranks or loader threads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from longtrain.data.curriculum import LengthStages, Stage, variable_length_schedule
from longtrain.data.decomposition import Decomposition
from longtrain.data.packing import Packing


@dataclass(frozen=True)
class StepPlan:
    step: int
    packing: Packing
    seq_ids: np.ndarray  # int64 [S]: the step's sequences of `packing`, all ranks
    rope_theta: float | None = None  # the stage's RoPE base; None keeps the model's
    stage: int = 0

    @property
    def seq_len(self) -> int:
        return self.packing.seq_len


class FixedLengthSchedule:
    """`global_batch` sequences of `packing` per step, in seeded per-epoch order."""

    def __init__(
        self, packing: Packing, global_batch: int, seed: int, shuffle: bool = True, key: int = 0
    ) -> None:
        if packing.num_sequences == 0:
            raise ValueError("the packing has no sequences: is the corpus empty?")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        self.packing, self.global_batch = packing, global_batch
        self.seed, self.shuffle, self.key = seed, shuffle, key
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = self.packing.num_sequences
            rng = np.random.default_rng([self.seed, self.key, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def plan(self, step: int) -> StepPlan:
        n = self.packing.num_sequences
        stream = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        ids = np.array([self._order(int(i // n))[i % n] for i in stream], dtype=np.int64)
        return StepPlan(step=step, packing=self.packing, seq_ids=ids)


class DecompositionSchedule:
    """Variable sequence length: every step trains `tokens_per_step` tokens from one bucket."""

    def __init__(
        self,
        decomposition: Decomposition,
        tokens_per_step: int,
        curriculum: str,
        cycles: int,
        seed: int,
    ) -> None:
        counts = decomposition.chunks_per_bucket()
        self.steps = variable_length_schedule(counts, tokens_per_step, curriculum, cycles, seed)
        self.decomposition, self.seed = decomposition, seed
        self.packings = {i: decomposition.as_packing(i) for i in counts if counts[i] > 0}
        buckets = np.array([i for i, _ in self.steps], dtype=np.int64)
        # uses_before[k]: how many earlier steps of the epoch read step k's bucket.
        self.uses_before = np.zeros(len(self.steps), dtype=np.int64)
        for i in np.unique(buckets):
            where = np.flatnonzero(buckets == i)
            self.uses_before[where] = np.arange(where.size)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.steps)

    def bucket_batch_sizes(self) -> set[int]:
        return {b for _, b in self.steps}

    def _order(self, bucket: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(bucket)
        if cached is None or cached[0] != epoch:  # one epoch's order per bucket is kept
            n = self.packings[bucket].num_sequences
            cached = (epoch, np.random.default_rng([self.seed, bucket, epoch]).permutation(n))
            self._orders[bucket] = cached
        return cached[1]

    def plan(self, step: int) -> StepPlan:
        epoch, k = divmod(step, len(self.steps))
        bucket, batch = self.steps[k]
        start = int(self.uses_before[k]) * batch  # quotas guarantee start + batch <= chunks
        ids = self._order(bucket, epoch)[start : start + batch].astype(np.int64)
        return StepPlan(step=step, packing=self.packings[bucket], seq_ids=ids)


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    global_batch: int


class StagedSchedule:
    """Stages of (steps, seq_len, rope_theta, global_batch); past the last, the last stage."""

    def __init__(
        self,
        stages: list[StageSpec],
        doc_lengths: np.ndarray,
        packer: Callable[[np.ndarray, int], Packing],
        seed: int,
        shuffle: bool = True,
    ) -> None:
        self.specs = stages
        self.lengths = LengthStages(tuple(s.stage for s in stages))
        self.doc_lengths, self.packer, self.seed, self.shuffle = doc_lengths, packer, seed, shuffle
        self._schedules: dict[int, FixedLengthSchedule] = {}

    def _schedule(self, index: int) -> FixedLengthSchedule:
        if index not in self._schedules:
            spec = self.specs[index]
            packing = self.packer(self.doc_lengths, spec.stage.seq_len)
            self._schedules[index] = FixedLengthSchedule(
                packing, spec.global_batch, self.seed, self.shuffle, key=index + 1
            )
        return self._schedules[index]

    def stage_start(self, index: int) -> int:
        return sum(s.stage.steps for s in self.specs[:index])

    def plan(self, step: int) -> StepPlan:
        index = self.lengths.index_at(step)
        inner = self._schedule(index).plan(step - self.stage_start(index))
        return StepPlan(
            step=step,
            packing=inner.packing,
            seq_ids=inner.seq_ids,
            rope_theta=self.specs[index].stage.rope_theta,
            stage=index,
        )
