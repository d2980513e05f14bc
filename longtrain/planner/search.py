"""The longest sequence that fits: a bracketing search over multiples of the layout's sequence
granularity, guided by the near-linear growth of peak memory with seq_len.

Peak memory is monotonic in seq_len (more tokens never need less memory) and close to affine
(tile counts add small steps). The search keeps a bracket [lo fits, hi does not], guesses by
linear interpolation (extrapolation before hi is known), and bisects whenever a guess fails
to halve the bracket, so it ends in a handful of simulations whatever the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from longtrain.planner.simulate import GIB, Planner, StepMemory


class PlanError(ValueError):
    """The configured run cannot fit at any sequence length; the message says why and what
    to change."""


@dataclass
class SearchResult:
    max_seq_len: int
    at_max: StepMemory
    limited_by: str  # "memory" or "plan.max_seq_len"
    evaluations: list = field(default_factory=list)  # StepMemory of every simulation


def budget_bytes(gpu_mem_gib: float, reserve_gib: float) -> int:
    """Bytes of one GPU that tensors may use."""
    if gpu_mem_gib <= 0 or reserve_gib < 0 or reserve_gib >= gpu_mem_gib:
        raise ValueError(
            f"plan.gpu_mem_gib={gpu_mem_gib} and plan.reserve_gib={reserve_gib}: need "
            "0 <= reserve < gpu memory"
        )
    return int((gpu_mem_gib - reserve_gib) * GIB)


def granule(planner: Planner) -> int:
    """seq_len step of the search: a multiple of plan.seq_len_step and of the layout's own."""
    step = planner.plan.seq_len_step
    if step < 1:
        raise ValueError(f"plan.seq_len_step={step} must be >= 1")
    return math.lcm(step, planner.seq_multiple())


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def impossible_message(planner: Planner, smallest: StepMemory, budget: int) -> str:
    cfg, split = planner.cfg, smallest.breakdown
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in split.items() if v)
    hints = []
    state = split["parameters"] + split["gradients"] + split["optimizer"]
    if cfg.train.engine == "deepspeed" and not cfg.train.deepspeed.offload_optimizer:
        hints.append("train.deepspeed.offload_optimizer=true")
    if cfg.train.engine == "deepspeed" and cfg.train.deepspeed.zero_stage < 3:
        hints.append("train.deepspeed.zero_stage=3")
    if cfg.train.engine != "deepspeed" and planner.world_size == 1:
        hints.append("train.engine=deepspeed with offload_optimizer (one GPU)")
    if cfg.train.memory.activation_checkpoint == "none":
        hints.append("train.memory.activation_checkpoint=full")
    hints.append("more GPUs (parallel.ulysses / parallel.ring, or plan.world_size)")
    hints.append("a larger plan.gpu_mem_gib")
    return (
        f"nothing fits: even seq_len={smallest.seq_len} needs {_gib(smallest.peak_bytes)} per "
        f"GPU (model state {_gib(state)}: {parts}; peak at {smallest.peak_at}), over the "
        f"budget of {_gib(budget)} (plan.gpu_mem_gib={planner.plan.gpu_mem_gib} minus "
        f"plan.reserve_gib={planner.plan.reserve_gib}). Try: " + "; ".join(hints)
    )


def predict_edge(a: StepMemory, b: StepMemory, budget: int) -> float:
    """The seq_len where the peak reaches `budget`, if every part of the step (forward, loss,
    backward, optimizer step) grows linearly through the points `a` and `b`: the peak is the
    largest part, and parts grow at different rates (the forward's high is mostly constants,
    the backward's mostly tokens), so each is extrapolated on its own."""
    edge = math.inf
    for label, high_b in b.phases.items():
        high_a = a.phases.get(label, high_b)
        slope = (high_b - high_a) / (b.seq_len - a.seq_len)
        if slope > 0:
            edge = min(edge, b.seq_len + (budget - high_b) / slope)
        elif high_b > budget:
            edge = min(edge, b.seq_len)
    return edge


def find_max_seq_len(planner: Planner, budget: int, first_guess: int) -> SearchResult:
    """Largest multiple of `granule(planner)` whose simulated peak fits `budget` bytes (capped
    at plan.max_seq_len). Raises PlanError when not even one granule fits."""
    g = granule(planner)
    cap = (planner.plan.max_seq_len // g) * g
    if cap < g:
        raise ValueError(f"plan.max_seq_len={planner.plan.max_seq_len} is below one step ({g})")
    seen: dict[int, StepMemory] = {}

    def measure(n: int) -> StepMemory:
        if n not in seen:
            seen[n] = planner.measure(n)
        return seen[n]

    def done(best: int, limited_by: str) -> SearchResult:
        return SearchResult(best, seen[best], limited_by, [seen[k] for k in sorted(seen)])

    lo = g
    if measure(lo).peak_bytes > budget:
        raise PlanError(impossible_message(planner, seen[lo], budget))
    # Grow from the configured length, extrapolating the slope of the two longest lengths
    # that fit (short lengths are dominated by constants, so their slope misleads).
    x = min(cap, max(2 * g, (first_guess // g) * g))
    if x >= 4 * g and measure(x // 2 // g * g).peak_bytes <= budget:
        lo = x // 2 // g * g
    hi = None
    while hi is None:
        if measure(x).peak_bytes > budget:
            hi = x
            break
        if x == cap:
            return done(cap, "plan.max_seq_len")
        prev, lo = lo, x
        edge = predict_edge(seen[prev], seen[lo], budget)
        guess = 2 * lo if math.isinf(edge) else edge
        x = min(cap, max(lo + g, int(guess) // g * g + g))  # just past the predicted edge
    halved = True
    while hi - lo > g:
        if halved:  # interpolate inside the bracket
            x = int(min(predict_edge(seen[lo], seen[hi], budget), hi)) // g * g
        else:
            x = (lo + hi) // 2 // g * g
        x = min(max(x, lo + g), hi - g)
        width = hi - lo
        if measure(x).peak_bytes <= budget:
            lo = x
            if x + g < hi and measure(x + g).peak_bytes > budget:
                hi = x + g  # the prediction landed on the edge
            elif x + g < hi:
                lo = x + g
        else:
            hi = x
        halved = hi - lo <= width // 2
    return done(lo, "memory")


__all__ = ["PlanError", "SearchResult", "budget_bytes", "find_max_seq_len", "granule"]
