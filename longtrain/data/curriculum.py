"""Variable sequence length schedules: which decomposition bucket each optimizer step reads.

Dataset decomposition (Pouransari et al. 2024; see `longtrain.data.decomposition`) gives
buckets of 2^i-token chunks. Every step reads one whole batch from one bucket, with a batch size
that keeps the tokens per step constant: batch_i = tokens_per_step / 2^i.

Sampling (as in the paper's reference scripts, where a bucket's mixing weight is its size times
the curriculum's odds): bucket i holds Q_i = floor(chunks_i / batch_i) batches, split evenly
over `cycles` cycles. Within a cycle each step draws bucket i with probability proportional to
odds_i * q_i among the buckets whose cycle quota q_i is not yet used up. The draw is a pure
function of the seed, so every rank computes the same schedule.

Since every bucket's weight is proportional to its quota, odds_i is the speed at which bucket i
is used up: bucket i runs out after about 1/odds_i of the cycle (on a continuous clock). Uniform
odds spread every bucket over the whole cycle; growing curricula (large odds for short buckets)
spend the short buckets first, so the sequence length grows through each cycle:

    uniform       odds 1 : 1 : ... : 1
    grow_linear   odds k : k-1 : ... : 1      (shortest bucket first; k buckets)
    grow_p2       odds 2^(k-1) : ... : 2 : 1

Chunks left over after the last full batch of a bucket are not scheduled.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from longtrain.config.schema import CURRICULA
from longtrain.data.packing import check_seq_len


def curriculum_odds(curriculum: str | Sequence[float], num_buckets: int) -> np.ndarray:
    """Odds of each bucket, shortest bucket first.

    Args:
        curriculum: one of `CURRICULA`, or explicit odds (one non-negative number per bucket,
            shortest first).
        num_buckets: >= 1.
    Returns:
        [num_buckets] float64 odds, >= 0, not all zero.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    k = num_buckets
    if isinstance(curriculum, str):
        if curriculum == "uniform":
            return np.ones(k)
        if curriculum == "grow_linear":
            return np.arange(k, 0, -1, dtype=np.float64)
        if curriculum == "grow_p2":
            return np.exp2(np.arange(k - 1, -1, -1, dtype=np.float64))
        raise ValueError(f"curriculum {curriculum!r} is not one of {CURRICULA} or a list of odds")
    odds = np.asarray(curriculum, dtype=np.float64)
    if odds.shape != (k,):
        raise ValueError(f"curriculum odds must have one entry per bucket ({k}), got {odds.shape}")
    if not np.all(np.isfinite(odds)) or np.any(odds < 0):
        raise ValueError(f"curriculum odds must be finite and >= 0, got {odds.tolist()}")
    if not np.any(odds > 0):
        raise ValueError(f"curriculum odds are all zero: {odds.tolist()}")
    return odds


def bucket_batch_sizes(buckets: Sequence[int], tokens_per_step: int) -> dict[int, int]:
    """Batch size of each bucket at a constant token budget.

    Args:
        buckets: bucket indices i (chunks of 2^i tokens), each >= 0.
        tokens_per_step: tokens per optimizer step, divisible by every 2^i.
    Returns:
        i -> tokens_per_step // 2^i.
    Raises:
        ValueError: empty bucket set, tokens_per_step < 1, or not divisible by some 2^i
            (the message names the bucket).
    """
    if len(buckets) == 0:
        raise ValueError("the bucket set is empty")
    tokens_per_step = check_seq_len(tokens_per_step, "tokens_per_step")
    out = {}
    for i in sorted(buckets):
        if i < 0:
            raise ValueError(f"bucket index must be >= 0, got {i}")
        if tokens_per_step % (1 << i):
            raise ValueError(
                f"tokens_per_step={tokens_per_step} is not divisible by 2^{i}={1 << i} "
                f"(bucket {i}); use a multiple of {1 << max(buckets)}"
            )
        out[i] = tokens_per_step >> i
    return out


def variable_length_schedule(
    bucket_counts: Mapping[int, int],
    tokens_per_step: int,
    curriculum: str | Sequence[float] = "uniform",
    cycles: int = 1,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """Per-step (bucket i, batch size) under a constant token budget and a length curriculum.

    The draw described in the module docstring is done at once: bucket i's q_i steps of a
    cycle get the arrival times of a Poisson process of rate odds_i * q_i (cumulative sums of
    exponential gaps) and the steps follow the merged arrival order. A process stopped after
    q_i arrivals is memoryless, so step by step this picks bucket i with probability
    odds_i * q_i / sum over buckets with quota left, exactly the sequential draw. Buckets with
    odds 0 are never drawn.

    Args:
        bucket_counts: i -> chunks of 2^i tokens (e.g. `Decomposition.chunks_per_bucket()`).
        tokens_per_step: tokens per optimizer step; every step has exactly this many.
        curriculum: "uniform", "grow_linear", "grow_p2", or explicit odds, shortest bucket
            first.
        cycles: number of curriculum cycles (>= 1); each cycle gets an equal share of every
            bucket's batches (the first cycles one more where it does not divide).
        seed: the schedule is a pure function of all arguments.
    Returns:
        [steps] list of (i, tokens_per_step // 2^i); steps = sum of the scheduled quotas.
    Raises:
        ValueError: empty bucket set, negative counts, tokens_per_step not divisible by some
            2^i, bad or all-zero odds, cycles < 1, or no bucket with both odds > 0 and a full
            batch.
    """
    if len(bucket_counts) == 0:
        raise ValueError("the bucket set is empty")
    cycles = check_seq_len(cycles, "cycles")
    buckets = sorted(bucket_counts)
    batch = bucket_batch_sizes(buckets, tokens_per_step)
    odds = curriculum_odds(curriculum, len(buckets))
    counts = np.array([bucket_counts[i] for i in buckets], dtype=np.int64)
    if np.any(counts < 0):
        raise ValueError(f"bucket counts must be >= 0, got {dict(zip(buckets, counts.tolist()))}")
    quota = counts // np.array([batch[i] for i in buckets], dtype=np.int64)
    quota[odds == 0] = 0
    if quota.sum() == 0:
        raise ValueError(
            f"no bucket with odds > 0 holds a full batch: chunks {dict(bucket_counts)}, "
            f"batch sizes {batch}, odds {odds.tolist()}"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    steps: list[np.ndarray] = []
    for c in range(cycles):
        q = quota // cycles + (c < quota % cycles)
        times, which = [], []
        for k in np.flatnonzero(q).tolist():
            gaps = rng.standard_exponential(int(q[k])) / (odds[k] * q[k])
            times.append(np.cumsum(gaps))
            which.append(np.full(int(q[k]), k, dtype=np.int64))
        if not times:  # fewer batches than cycles: the last cycles are empty
            continue
        order = np.argsort(np.concatenate(times), kind="stable")
        steps.append(np.concatenate(which)[order])
    ks = np.concatenate(steps)
    bucket_of = np.array(buckets, dtype=np.int64)[ks]
    batch_of = np.array([batch[i] for i in buckets], dtype=np.int64)[ks]
    return list(zip(bucket_of.tolist(), batch_of.tolist()))


@dataclass(frozen=True)
class Stage:
    """One stage of a sequence-length schedule.

    Attributes:
        steps: optimizer steps in the stage, >= 1.
        seq_len: tokens per sequence during the stage, >= 1.
        rope_theta: RoPE base during the stage, > 0.
    """

    steps: int
    seq_len: int
    rope_theta: float

    def __post_init__(self) -> None:
        check_seq_len(self.steps, "Stage.steps")
        check_seq_len(self.seq_len, "Stage.seq_len")
        if not self.rope_theta > 0:
            raise ValueError(f"Stage.rope_theta must be > 0, got {self.rope_theta!r}")


@dataclass(frozen=True)
class LengthStages:
    """A staged context-length schedule (e.g. 8k, then 32k with a larger RoPE base).

    Stage k covers steps [sum of earlier steps, that + stages[k].steps); steps past the end
    stay in the last stage.

    Attributes:
        stages: the stages in order; tuples (steps, seq_len, rope_theta) are accepted.
    """

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if len(self.stages) == 0:
            raise ValueError("LengthStages needs at least one stage")
        stages = tuple(s if isinstance(s, Stage) else Stage(*s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "_ends", np.cumsum([s.steps for s in stages]).tolist())

    @property
    def total_steps(self) -> int:
        """Steps covered by all stages."""
        return self._ends[-1]

    def index_at(self, step: int) -> int:
        """Index of the stage that holds optimizer step `step` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return min(bisect.bisect_right(self._ends, step), len(self.stages) - 1)

    def stage_at(self, step: int) -> Stage:
        """The stage that holds optimizer step `step` (>= 0); past the end, the last stage."""
        return self.stages[self.index_at(step)]
