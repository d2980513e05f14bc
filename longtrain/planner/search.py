"""The longest sequence that fits both the GPU and the host: a bracketing search over
multiples of the layout's sequence granularity, guided by the near-linear growth of peak
memory with seq_len, and the offload split that runs it.

Two budgets: `plan.gpu_mem_gib - plan.reserve_gib` per GPU, and the node's host memory
`plan.host_mem_gib` shared by min(world size, plan.gpus_per_node) GPUs. Offloading one more
block's inputs takes one block input off the GPU and puts it on the host, so for each
seq_len the host decides how many blocks may offload (k*, at most the configured count) and
the length fits iff the GPU peak fits with k* offloaded; it says which bound binds. At the
answer the split is the fewest offloaded blocks whose GPU peak fits (less host memory and
less traffic), printed as the overrides that run it.

Peak memory is monotonic in seq_len (more tokens never need less memory) and close to affine
(tile counts add small steps). The search keeps a bracket [lo fits, hi does not], guesses by
linear interpolation (extrapolation before hi is known), and bisects whenever a guess fails
to halve the bracket, so it ends in a handful of simulations whatever the curve.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from longtrain.planner.simulate import GIB, Planner, StepMemory


class PlanError(ValueError):
    """The configured run cannot fit at any sequence length; the message says why and what
    to change."""


@dataclass
class Fit:
    """One sequence length against both budgets: the step at the offload split the host
    allows (k* = min(configured count, what the host holds)), and whether it fits."""

    seq_len: int
    at: StepMemory  # the step with k* blocks offloaded
    fits: bool
    binds: str  # "" when it fits, else "gpu memory" or "host memory"
    block_host: float = 0.0  # host bytes of one offloaded block's inputs at this length
    top: StepMemory | None = None  # the step at the configured count (the most offload)


@dataclass
class SearchResult:
    max_seq_len: int
    at_max: StepMemory  # at the smallest offload split that fits the GPU
    limited_by: str  # "gpu memory", "host memory" or "plan.max_seq_len"
    evaluations: list = field(default_factory=list)  # Fit of every length tried


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


def host_limit(planner: Planner, top: StepMemory) -> int:
    """The most blocks (up to the configured count) whose offloaded inputs the host holds
    beside the engine's own host state, from `top` (the step at the configured count):
    offloaded inputs take the same host bytes per block."""
    k_max = top.offloaded_blocks
    free = planner.host_budget - planner.engine.host
    per_block = top.host_breakdown.get("offloaded activations", 0) / max(k_max, 1)
    if free < 0:
        return -1  # the engine's host state alone is over the budget
    if per_block == 0:
        return k_max
    return min(k_max, int(free // per_block))


def evaluate(planner: Planner, seq_len: int, budget: int) -> Fit:
    """Whether `seq_len` fits both budgets with some offload split. Peak GPU memory never
    grows with more blocks offloaded and host memory grows with each, so it fits iff the GPU
    fits at k* = min(configured count, host limit)."""
    top = planner.measure(seq_len)
    block_host = top.host_breakdown.get("offloaded activations", 0) / max(1, top.offloaded_blocks)
    if top.peak_bytes > budget:  # the most offload allowed does not fit the GPU
        return Fit(seq_len, top, False, "gpu memory", block_host, top)
    k = host_limit(planner, top)
    if k < 0:
        return Fit(seq_len, top, False, "host memory", block_host, top)
    at = top if k == top.offloaded_blocks else planner.measure(seq_len, k)
    fits = at.peak_bytes <= budget and at.host_bytes <= planner.host_budget
    binds = "" if fits else ("gpu memory" if k == top.offloaded_blocks else "host memory")
    return Fit(seq_len, at, fits, binds, block_host, top)


def smallest_split(planner: Planner, seq_len: int, budget: int, fits_at: int) -> StepMemory:
    """The step with the fewest blocks offloaded whose GPU peak fits `budget`, knowing that
    `fits_at` blocks do (bisection: the peak never grows with more blocks offloaded)."""
    lo, hi = -1, fits_at  # lo: known not to fit (or none tried), hi: fits
    best = planner.measure(seq_len, hi)
    if hi > 0:  # at the longest length one block fewer rarely fits: try it first
        step = planner.measure(seq_len, hi - 1)
        if step.peak_bytes > budget:
            return best
        hi, best = hi - 1, step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        step = planner.measure(seq_len, mid)
        if step.peak_bytes <= budget:
            hi, best = mid, step
        else:
            lo = mid
    return best


def impossible_message(planner: Planner, smallest: Fit, budget: int) -> str:
    cfg, at = planner.cfg, smallest.at
    if smallest.binds == "host memory":
        return _host_message(planner, smallest)
    split = at.breakdown
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
    elif at.offloaded_blocks < planner.n_layers:
        hints.append("train.memory.offload_activations=true")
    hints.append("more GPUs (parallel.ulysses / parallel.ring, or plan.world_size)")
    hints.append("a larger plan.gpu_mem_gib")
    return (
        f"nothing fits: even seq_len={at.seq_len} needs {_gib(at.peak_bytes)} per "
        f"GPU (model state {_gib(state)}: {parts}; peak at {at.peak_at}; "
        f"{at.offloaded_blocks} of {planner.n_layers} blocks offloaded), over the "
        f"budget of {_gib(budget)} (plan.gpu_mem_gib={planner.plan.gpu_mem_gib} minus "
        f"plan.reserve_gib={planner.plan.reserve_gib}). Try: " + "; ".join(hints)
    )


def _host_message(planner: Planner, smallest: Fit) -> str:
    at, plan = smallest.at, planner.plan
    engine = ", ".join(f"{k} {_gib(v)}" for k, v in planner.engine.host_parts.items())
    return (
        f"nothing fits in host memory: at seq_len={at.seq_len} the GPU needs more blocks "
        f"offloaded than the host holds ({at.offloaded_blocks} of {planner.n_layers}: "
        f"{_gib(at.host_bytes)} per GPU, engine state {engine or 'none'}), over the host "
        f"budget of {_gib(planner.host_budget)} per GPU (plan.host_mem_gib={plan.host_mem_gib:g} "
        f"shared by {planner.gpus_per_node} GPUs). Try: a larger plan.host_mem_gib; fewer "
        "GPUs per node (plan.gpus_per_node); more GPUs; train.deepspeed.offload_params=false"
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
    """Largest multiple of `granule(planner)` that fits `budget` bytes per GPU and the host
    budget (`evaluate`), capped at plan.max_seq_len, at the smallest offload split that fits.
    Raises PlanError when not even one granule fits."""
    g = granule(planner)
    cap = (planner.plan.max_seq_len // g) * g
    if cap < g:
        raise ValueError(f"plan.max_seq_len={planner.plan.max_seq_len} is below one step ({g})")
    seen: dict[int, Fit] = {}
    fitting: list[int] = []  # lengths known to fit, ascending

    def fits(n: int) -> bool:
        if n not in seen:
            seen[n] = evaluate(planner, n, budget)
            if seen[n].fits:
                bisect.insort(fitting, n)
        return seen[n].fits

    def edge(a: int, b: int) -> float:
        """Where the lengths a < b say the edge is. The GPU's at the most offload: each part
        of the step extrapolated on its own. When the host decides the split it can be
        earlier: host bytes per block grow linearly with the length, so k* = free host /
        (bytes per block) falls, and each block fewer offloaded than at b puts its input
        back on the GPU (about its host bytes); the edge is where b's peak, grown at the
        most-offload slope plus those inputs, reaches the budget."""
        fa, fb = seen[a], seen[b]
        guess = predict_edge(fa.top, fb.top, budget)
        host_slope = (fb.block_host - fa.block_host) / (b - a)
        if not fb.top.offloaded_blocks or host_slope <= 0:
            return guess
        free = planner.host_budget - planner.engine.host
        top_slope = (fb.top.peak_bytes - fa.top.peak_bytes) / (b - a)
        k_b = fb.at.offloaded_blocks

        def fits_model(n: float) -> bool:
            block_host = fb.block_host + (n - b) * host_slope
            k = min(fb.top.offloaded_blocks, math.floor(free / block_host))
            peak = fb.at.peak_bytes + (n - b) * top_slope + max(0, k_b - k) * block_host
            return k >= 0 and peak <= budget

        lo, hi = float(b), float(min(guess, cap))
        if not fits_model(lo):
            return lo
        if fits_model(hi):
            return hi
        while hi - lo > g / 2:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits_model(mid) else (lo, mid)
        return lo

    def bracket_edge(lo: int, hi: int) -> float:
        """Inside [lo, hi]: from both ends when the GPU bounds hi at lo's split (one curve),
        else from the two longest lengths that fit."""
        same = seen[hi].at.offloaded_blocks == seen[lo].at.offloaded_blocks
        if seen[hi].binds == "gpu memory" and same:
            return predict_edge(seen[lo].at, seen[hi].at, budget)
        return edge(*fitting[-2:])

    def done(best: int, limited_by: str) -> SearchResult:
        at = smallest_split(planner, best, budget, seen[best].at.offloaded_blocks)
        return SearchResult(best, at, limited_by, [seen[k] for k in sorted(seen)])

    lo = g
    if not fits(lo):
        raise PlanError(impossible_message(planner, seen[lo], budget))
    # Grow from the configured length, extrapolating the two longest lengths that fit (short
    # lengths are dominated by constants, so their slope misleads).
    x = min(cap, max(2 * g, (first_guess // g) * g))
    if x >= 4 * g and fits(x // 2 // g * g):
        lo = x // 2 // g * g
    hi = None
    while hi is None:
        if not fits(x):
            hi = x
            break
        if x == cap:
            return done(cap, "plan.max_seq_len")
        lo = x
        guess = edge(*fitting[-2:])
        guess = 2 * lo if math.isinf(guess) else guess
        x = min(cap, max(lo + g, int(guess) // g * g + g))  # just past the predicted edge
    halved = True
    while hi - lo > g:
        x = (lo + hi) // 2 // g * g  # bisect, unless a prediction lands inside
        if halved and len(fitting) >= 2:
            guess = bracket_edge(lo, hi)
            if lo < guess < hi:
                x = int(guess) // g * g
        x = min(max(x, lo + g), hi - g)
        width = hi - lo
        if fits(x):
            lo = x
        else:
            hi = x
        halved = hi - lo <= width // 2
    return done(lo, seen[hi].binds)


__all__ = [
    "Fit",
    "PlanError",
    "SearchResult",
    "budget_bytes",
    "evaluate",
    "find_max_seq_len",
    "granule",
    "host_limit",
    "smallest_split",
]
