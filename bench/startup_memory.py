"""Host memory per rank at start-up: building the whole model on every rank and sharding it
after (what the trainer did before the meta-device start) against the meta-device start
(`longtrain.distributed.meta_start`), same model and layout, in one run. Prints a table,
writes bench/results/startup_memory.json.

    python -m bench.startup_memory            # model=llama3_1b model.n_layers=4, 4 ranks
    python -m bench.startup_memory --layers 2 --world 2

Each rank is a fresh process (gloo, CPU, FSDP2 over all ranks, float32 master weights as in
a bf16 run); it reads its resident set size (VmRSS in /proc/self/status) once the model is
built and sharded, before any step, and its high-water mark (VmHWM) up to then. The
baseline (Python, torch, the process group) is read before the model is built and reported
apart; the ratio is of the whole RSS, as a user's `top` shows it.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from bench import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "startup_memory.json"
GIB = 1 << 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_config(layers: int):
    from longtrain.config import RunConfig
    from longtrain.train import load_config

    cfg: RunConfig = load_config(["model=llama3_1b", f"model.n_layers={layers}"])
    cfg.train.engine = "fsdp2"
    cfg.model.attn_backend = cfg.model.kernel_backend = "torch"
    return cfg


def _measure_rank(rank: int, world: int, how: str, layers: int) -> dict:
    from longtrain.distributed import DistEnv
    from longtrain.distributed.meta_start import build_parallel_model
    from longtrain.distributed.parallelize import build_parallel_dims, parallelize
    from longtrain.model import build_model

    torch.set_num_threads(1)
    cfg = run_config(layers)
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    dims = build_parallel_dims(cfg, env)
    gc.collect()
    baseline = _status_kib("VmRSS")
    if how == "build, then shard":
        model = build_model(cfg.model, seed=cfg.train.seed, device=env.device)
        model, _ = parallelize(model, dims, cfg, env, pad_id=0)
    else:
        model, _ = build_parallel_model(cfg, env, dims, pad_id=0)
    gc.collect()
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return {
        "rss_bytes": _status_kib("VmRSS") * 1024,
        "hwm_bytes": _status_kib("VmHWM") * 1024,
        "baseline_bytes": baseline * 1024,
        "shard_bytes": local,
    }


def measure(how: str, world: int, layers: int) -> dict:
    from tests.spawn import spawn

    ranks = spawn(_measure_rank, world, how, layers, timeout=900)
    return {
        "start": how,
        "world_size": world,
        "rss_bytes": max(r["rss_bytes"] for r in ranks),
        "hwm_bytes": max(r["hwm_bytes"] for r in ranks),
        "baseline_bytes": max(r["baseline_bytes"] for r in ranks),
        "shard_bytes": max(r["shard_bytes"] for r in ranks),
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'start':<22}{'ranks':>6}{'RSS GiB':>10}{'peak GiB':>10}{'baseline':>10}{'shard':>8}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['start']:<22}{r['world_size']:>6}{r['rss_bytes'] / GIB:>10.2f}"
            f"{r['hwm_bytes'] / GIB:>10.2f}{r['baseline_bytes'] / GIB:>10.2f}"
            f"{r['shard_bytes'] / GIB:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--world", type=int, default=4)
    args = parser.parse_args(argv)
    rows = [measure(how, args.world, args.layers) for how in ("build, then shard", "meta")]
    print(format_table(rows))
    old, new = rows
    result = {
        "model": f"llama3_1b, n_layers={args.layers}, float32 master weights",
        "rows": rows,
        "rss_ratio_meta_over_build": new["rss_bytes"] / old["rss_bytes"],
        "peak_ratio_meta_over_build": new["hwm_bytes"] / old["hwm_bytes"],
    }
    print(
        f"meta / build-then-shard, per rank: RSS {result['rss_ratio_meta_over_build']:.2f}, "
        f"peak {result['peak_ratio_meta_over_build']:.2f}"
    )
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
