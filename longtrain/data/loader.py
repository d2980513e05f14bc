"""Deterministic, resumable loader of packed batches, sharded over data-parallel ranks.

Each optimizer step's sequences come from a schedule (`longtrain.data.schedule`), a pure
function of the step; this loader assigns them to data-parallel ranks balancing attention
cost (`longtrain.data.balance`), splits this rank's share into micro-batches and builds them,
one step ahead in a background thread so the training step never waits on packing. Its state
is just the next step, so a resume is bitwise exact and independent of threads or workers.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from longtrain.data.balance import balanced_assignment, imbalance, sequence_costs
from longtrain.data.batch import PackedBatch, build_batch
from longtrain.data.schedule import StepPlan


@dataclass
class StepBatches:
    step: int
    micro_batches: list[PackedBatch]  # this rank's share, split into micro-batches
    seq_len: int
    rope_theta: float | None  # the stage's RoPE base (None: the model's own)
    stage: int
    cost_imbalance: float  # max / mean attention cost over data-parallel ranks


class PackedLoader:
    """Yields `StepBatches` for steps `next_step, next_step + 1, ...`.

    `micro_tokens`: tokens per micro-batch on this rank (0: the whole share in one); with
    variable sequence lengths a micro-batch holds micro_tokens // seq_len sequences.
    `loss_mask`: the store's per-token training targets (chat data), or None: all tokens.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        schedule,
        dp_rank: int,
        dp_size: int,
        pad_id: int,
        micro_tokens: int = 0,
        balance: bool = True,
        loss_weighting: str = "token",
        prefetch: int = 1,
        loss_mask: np.ndarray | None = None,
    ) -> None:
        self.tokens, self.offsets, self.schedule = tokens, offsets, schedule
        self.dp_rank, self.dp_size, self.pad_id = dp_rank, dp_size, pad_id
        self.micro_tokens, self.balance = micro_tokens, balance
        self.loss_weighting, self.prefetch = loss_weighting, prefetch
        self.loss_mask = loss_mask  # the store's (1: a training target), or None
        self.next_step = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self.check_step(0)

    def check_step(self, step: int) -> None:
        """Raise ValueError (naming the numbers) if `step`'s batch cannot be split."""
        self._split(self.schedule.plan(step))

    def _split(self, plan: StepPlan) -> tuple[int, int]:
        """(sequences per rank, sequences per micro-batch) of `plan`."""
        n = len(plan.seq_ids)
        if n % self.dp_size:
            raise ValueError(
                f"step {plan.step} has {n} sequences of {plan.seq_len} tokens, not divisible "
                f"by the data-parallel size {self.dp_size}; use a global batch (or tokens per "
                f"step) that is a multiple of {self.dp_size} sequences"
            )
        local = n // self.dp_size
        micro = max(1, self.micro_tokens // plan.seq_len) if self.micro_tokens else local
        if local % micro:
            raise ValueError(
                f"a micro-batch of {micro} sequences ({self.micro_tokens} tokens / "
                f"{plan.seq_len}) must divide the per-rank batch ({local}) at step {plan.step}"
            )
        return local, micro

    def batches_for_step(self, step: int) -> StepBatches:
        """This rank's micro-batches of optimizer step `step` (a pure function of the step)."""
        plan = self.schedule.plan(step)
        local, micro = self._split(plan)
        costs = sequence_costs(plan.packing, plan.seq_ids)
        if self.balance and self.dp_size > 1:
            groups = balanced_assignment(costs, self.dp_size)
        else:
            groups = [np.arange(r * local, (r + 1) * local) for r in range(self.dp_size)]
        mine = plan.seq_ids[groups[self.dp_rank]]
        batches = [
            build_batch(
                self.tokens,
                self.offsets,
                plan.packing,
                mine[i : i + micro],
                self.pad_id,
                self.loss_weighting,
                self.loss_mask,
            )
            for i in range(0, local, micro)
        ]
        return StepBatches(
            step=step,
            micro_batches=batches,
            seq_len=plan.seq_len,
            rope_theta=plan.rope_theta,
            stage=plan.stage,
            cost_imbalance=imbalance(costs, groups),
        )

    def _submit(self, step: int) -> None:
        if step not in self._pending:
            self._pending[step] = self._pool.submit(self.batches_for_step, step)

    def __iter__(self):
        if self.prefetch <= 0:
            while True:
                batches = self.batches_for_step(self.next_step)
                self.next_step += 1
                yield batches
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longtrain-loader")
        try:
            while True:
                step = self.next_step
                for ahead in range(step, step + 1 + self.prefetch):
                    self._submit(ahead)
                batches = self._pending.pop(step).result()
                self.next_step += 1
                yield batches
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background thread (pending prefetches are dropped)."""
        if self._pool is not None:
            for fut in self._pending.values():
                fut.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "seed": self.schedule.seed}

    def load_state_dict(self, state: dict) -> None:
        if self._pending:
            raise RuntimeError("load_state_dict on a loader that is already iterating")
        if state.get("seed", self.schedule.seed) != self.schedule.seed:
            raise ValueError(
                f"checkpoint data seed {state['seed']} differs from train.seed {self.schedule.seed}"
            )
        self.next_step = int(state["next_step"])
