"""Peak memory of a CPU training step with the memory stack off and on, measured, with the
planner's prediction beside it. Prints a table, writes bench/results/memory.json.

    python -m bench.memory            # all cases (~1-2 min on 2 cores)
    python -m bench.memory --quick    # a shorter sequence

Measured: the run is built as the trainer builds it (`parallelize`: the memory stack, FSDP2,
and the step context's precision: autocast or bf16 gathers for model.dtype=bfloat16) and
trained for two steps under `torch.profiler` with
`profile_memory=True`; the profiler receives every allocation and free of the CPU allocator
(c10's memory reporting, not our planner's bookkeeping). Summing them in time order gives
the bytes of live tensors at every moment, from before the model exists; the peak inside
step 2 (steady state: the optimizer state exists) is the measurement. Multi-process cases
(gloo) measure every rank and report the largest. Predicted: `longtrain.planner.Planner`
with `plan.device=cpu` (CPU kernels' workspaces, offloaded activations stay in the same
memory) at the same world size, parallel layout, engine and memory settings.

The stack on a CPU: tiles and checkpointing cut activations as on a GPU; offload moves the
saved block inputs into "host" memory, which on a CPU is the same memory (no saving).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench import write_results
from longtrain.config import ModelConfig, ParallelConfig, RunConfig

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
MIB = 1 << 20
STACK = {"mlp_tiles": 0, "mlp_tile_budget_mib": 1, "activation_checkpoint": "full",
         "offload_activations": True}  # fmt: skip
CASES = [
    # name, world size, parallel method, engine, memory settings, model.dtype
    ("plain", 1, "none", "none", {}, "float32"),
    ("tiled MLP (1 MiB tiles)", 1, "none", "none", {"mlp_tiles": 0, "mlp_tile_budget_mib": 1},
     "float32"),
    ("full checkpointing", 1, "none", "none", {"activation_checkpoint": "full"}, "float32"),
    ("selective checkpointing", 1, "none", "none", {"activation_checkpoint": "selective"},
     "float32"),
    ("stack: tiles + full AC + offload", 1, "none", "none", STACK, "float32"),
    ("stack, offload 2 of 4 blocks", 1, "none", "none", {**STACK, "offload_activations": 2},
     "float32"),
    ("ulysses 2, plain", 2, "ulysses", "fsdp2", {}, "float32"),
    ("ulysses 2, stack, fsdp2", 2, "ulysses", "fsdp2", STACK, "float32"),
    ("dp 2, stack, fsdp2", 2, "none", "fsdp2", STACK, "float32"),
    # model.dtype=bfloat16: autocast over float32 weights (one process), bf16 gathers (FSDP2)
    ("plain, bf16", 1, "none", "none", {}, "bfloat16"),
    ("stack: tiles + full AC + offload, bf16", 1, "none", "none", STACK, "bfloat16"),
    ("ulysses 2, stack, fsdp2, bf16", 2, "ulysses", "fsdp2", STACK, "bfloat16"),
    ("dp 2, stack, fsdp2, bf16", 2, "none", "fsdp2", STACK, "bfloat16"),
]  # fmt: skip


def run_config(
    world: int, method: str, engine: str, memory: dict, seq_len: int, dtype: str = "float32"
) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(
        name="bench_256", vocab_size=259, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
        ffn_dim=704, attn_backend="torch", kernel_backend="torch", dtype=dtype,
    )  # fmt: skip
    cfg.data.seq_len = seq_len
    cfg.parallel = ParallelConfig(method=method, ulysses=world if method == "ulysses" else 1)
    cfg.train.engine = engine
    cfg.train.global_batch = world if method == "none" else 1
    for key, value in memory.items():
        setattr(cfg.train.memory, key, value)
    return cfg


def _batch(seq_len: int, seed: int):
    from longtrain.data.batch import build_batch
    from longtrain.data.packing import best_fit

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 259, size=seq_len, dtype=np.int64)
    offsets = np.array([0, seq_len], dtype=np.int64)
    return build_batch(tokens, offsets, best_fit(np.array([seq_len]), seq_len), np.array([0]), 0)


def _peak_in(prof, step_name: str) -> tuple[int, int]:
    """(largest sum of live allocations inside `step_name`, the sum when it starts), counted
    from the profile's start.

    Allocations are matched to frees by address. A free done by another thread (gloo's
    workers drop the last reference to a collective's buffers) is not reported to the
    profiler; its address being handed out again proves the block was freed, so a new
    allocation at a live address replaces the stale one instead of adding to it."""
    from torch._C._profiler import _EventType

    results = prof.profiler.kineto_results
    allocations = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                allocations.append((node.start_time_ns, fields.ptr, fields.alloc_size))
            walk(node.children)

    walk(results.experimental_event_tree())
    start, end = next((e.start_ns(), e.end_ns()) for e in results.events() if e.name() == step_name)
    live: dict[int, int] = {}
    total = peak = 0
    at_start = None
    for t, ptr, size in sorted(allocations):
        if at_start is None and t >= start:
            at_start = total
        total -= live.pop(ptr, 0)
        if size > 0:
            live[ptr] = size
            total += size
        if start <= t <= end:
            peak = max(peak, total)
    return peak, total if at_start is None else at_start


def _measure(rank: int, world: int, case: tuple, seq_len: int) -> tuple[int, int]:
    """Train two steps of `case` as the trainer builds it (`parallelize`: memory stack,
    FSDP2, the step context's precision) under the profiler; (the peak bytes of step 2 on
    this rank, the bytes live when step 2 starts: model and optimizer state)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from longtrain.distributed import DistEnv
    from longtrain.distributed.parallelize import build_parallel_dims, parallelize
    from longtrain.model import build_model
    from longtrain.trainer.optimizer import build_optimizer, build_scheduler
    from longtrain.trainer.step import train_step

    _, _, method, engine, memory, dtype = case
    cfg = run_config(world, method, engine, memory, seq_len, dtype)
    env = DistEnv(rank, world, 0, torch.device("cpu"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        dims = build_parallel_dims(cfg, env)
        model = build_model(cfg.model, seed=0)
        model, ctx = parallelize(model, dims, cfg, env, pad_id=0)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, 2)
        for step in (1, 2):
            seed = step * 100 + (rank if method == "none" else 0)
            with record_function(f"step_{step}"):
                train_step(model, optimizer, scheduler, [_batch(seq_len, seed)], ctx)
    return _peak_in(prof, "step_2")


def measure_forward_activations(case: tuple, seq_len: int) -> int:
    """One process: the most bytes the forward (`forward_loss`: blocks, final norm, tiled
    loss) of step 2 holds above what was live when it started, from the allocator's events:
    the activations it saves for the backward and its temporaries at their high."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from longtrain.distributed import DistEnv
    from longtrain.distributed.parallelize import build_parallel_dims, parallelize
    from longtrain.model import build_model
    from longtrain.trainer.optimizer import build_optimizer, build_scheduler
    from longtrain.trainer.step import train_step

    name, world, method, engine, memory, dtype = case
    if world != 1:
        raise ValueError(f"{name}: forward activations are measured on one process")
    cfg = run_config(world, method, engine, memory, seq_len, dtype)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    forwards: list = []

    def enter(module, args):
        forwards.append(record_function(f"forward_{len(forwards) + 1}"))
        forwards[-1].__enter__()

    def leave(module, args, output):
        forwards[-1].__exit__(None, None, None)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(cfg.model, seed=0)
        model, ctx = parallelize(model, build_parallel_dims(cfg, env), cfg, env, pad_id=0)
        model.register_forward_pre_hook(enter)
        model.register_forward_hook(leave)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, 2)
        for step in (1, 2):
            train_step(model, optimizer, scheduler, [_batch(seq_len, step * 100)], ctx)
    peak, at_start = _peak_in(prof, "forward_2")
    return peak - at_start


def _measure_rank(rank: int, world: int, case: tuple, seq_len: int) -> tuple[int, int]:
    torch.set_num_threads(1 if world > 1 else 2)
    return _measure(rank, world, case, seq_len)


def predict(case: tuple, seq_len: int):
    from longtrain.config import PlanConfig
    from longtrain.planner.simulate import Planner

    _, world, method, engine, memory, dtype = case
    cfg = run_config(world, method, engine, memory, seq_len, dtype)
    plan = PlanConfig(gpu_mem_gib=1024, reserve_gib=0, world_size=world, device="cpu")
    with Planner(cfg, plan, exact_layers=True) as planner:
        return planner.measure(seq_len)


def run_case(case: tuple, seq_len: int, repeats: int = 1) -> dict:
    """Measure `case` (the least of `repeats` runs: a free done on a gloo thread is seen only
    when its address is reused, which can only add bytes) and predict it."""
    from tests.spawn import spawn

    name, world = case[0], case[1]
    t0 = time.perf_counter()
    runs = [max(spawn(_measure_rank, world, case, seq_len, timeout=900)) for _ in range(repeats)]
    measured, at_start = min(runs)
    predicted = predict(case, seq_len)
    return {
        "case": name,
        "world_size": world,
        "dtype": case[5],
        "seq_len": seq_len,
        "measured_bytes": int(measured),
        "measured_step_bytes": int(measured - at_start),  # above the model and optimizer state
        "predicted_bytes": predicted.peak_bytes,
        "error": predicted.peak_bytes / measured - 1,
        "predicted_peak_at": predicted.peak_at,
        "predicted_breakdown": predicted.breakdown,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'case':<40}{'world':>6}{'measured MiB':>14}{'planner MiB':>13}{'error':>8}  at"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['case']:<40}{r['world_size']:>6}{r['measured_bytes'] / MIB:>14.1f}"
            f"{r['predicted_bytes'] / MIB:>13.1f}{r['error']:>+8.1%}  {r['predicted_peak_at']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seq_len 1024 instead of 4096")
    parser.add_argument("--seq-len", type=int, default=0)
    args = parser.parse_args(argv)
    seq_len = args.seq_len or (1024 if args.quick else 4096)
    rows = [run_case(case, seq_len, repeats=3 if case[1] > 1 else 1) for case in CASES]
    print(format_table(rows))
    meta = {"model": run_config(1, "none", "none", {}, seq_len).model.__dict__, "rows": rows}
    bf16 = {r["case"]: r for r in rows if r["dtype"] == "bfloat16"}
    for r in rows:
        twin = bf16.get(f"{r['case']}, bf16")
        if r["dtype"] == "float32" and twin:
            ratio = twin["measured_step_bytes"] / r["measured_step_bytes"]
            print(f"{r['case']}: bf16 / float32 step memory (measured) = {ratio:.3f}")
    write_results(RESULTS, meta)
    return rows


if __name__ == "__main__":
    main()
