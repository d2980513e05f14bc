"""`python -m longtrain.plan [overrides]`: what one GPU of the configured run will hold, and the
longest sequence that fits, before launching anything.

Takes the same overrides as `longtrain.train` plus the `plan` group (`longtrain.config`):
    python -m longtrain.plan experiment=llama3_8b_1m_sp8
    python -m longtrain.plan experiment=llama3_8b_1m_sp8 parallel.ulysses=4 plan.gpu_mem_gib=40

Simulates one training step on fake tensors at the target world size (`longtrain.planner`),
prints the peak per GPU by category for `data.seq_len` and for the longest seq_len that fits
`plan.gpu_mem_gib` (less `plan.reserve_gib`), and writes `<run_dir>/plan.json` with at least
`peak_bytes_per_gpu` and `max_seq_len`. Exit status 0 with a plan (whether data.seq_len fits
is in `fits`), 2 when nothing fits or the config is invalid (the message says what to change).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from longtrain.config import PlanConfig, precheck_overrides, register_configs, to_run_config
from longtrain.errors import LongtrainError, report_errors
from longtrain.planner.search import PlanError, budget_bytes, find_max_seq_len
from longtrain.planner.simulate import GIB, Planner, StepMemory


def _point(m: StepMemory) -> dict:
    return {
        "seq_len": m.seq_len,
        "tokens_per_gpu": m.tokens_per_gpu,
        "peak_bytes_per_gpu": m.peak_bytes,
        "peak_at": m.peak_at,
        "breakdown_bytes": m.breakdown,
        "host_bytes_per_gpu": m.host_bytes,
    }


def make_plan(cfg) -> dict:
    """Simulate `cfg` (a config with `.plan`) and return the plan.json content."""
    plan: PlanConfig = cfg.plan
    t0 = time.perf_counter()
    budget = budget_bytes(plan.gpu_mem_gib, plan.reserve_gib)
    with Planner(cfg, plan) as planner:
        configured = planner.measure(cfg.data.seq_len)
        report = {
            **_point(configured),
            "fits": configured.peak_bytes <= budget,
            "budget_bytes_per_gpu": budget,
            "gpu_mem_gib": plan.gpu_mem_gib,
            "reserve_gib": plan.reserve_gib,
            "device": plan.device,
            "model": cfg.model.name,
            "world_size": planner.world_size,
            "layout": {"dp": planner.dp, "ulysses": planner.ulysses, "ring": planner.ring},
            "engine": configured.engine,
            "micro_batch": planner.micro_batch,
            "memory": dataclasses.asdict(cfg.train.memory),
            "deepspeed": dataclasses.asdict(cfg.train.deepspeed),
        }
        if plan.search:
            found = find_max_seq_len(planner, budget, first_guess=cfg.data.seq_len)
            report["max_seq_len"] = found.max_seq_len
            report["max_seq_len_limited_by"] = found.limited_by
            report["at_max_seq_len"] = _point(found.at_max)
            report["evaluations"] = [
                {"seq_len": m.seq_len, "peak_bytes_per_gpu": m.peak_bytes}
                for m in found.evaluations
            ]
        else:
            report["max_seq_len"] = None
    report["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return report


def _row(name: str, cols, value) -> str:
    return f"{name:<22}" + "".join(f"{value(c):>16.2f}" for _, c in cols)


def format_table(report: dict) -> str:
    """The breakdown per GPU for data.seq_len and for max_seq_len, side by side."""
    cols = [("data.seq_len", report)]
    if report.get("at_max_seq_len"):
        cols.append(("max_seq_len", report["at_max_seq_len"]))
    lay = report["layout"]
    lines = [
        f"plan: {report['model']} on {report['world_size']} GPU(s) = dp={lay['dp']} x "
        f"ulysses={lay['ulysses']} x ring={lay['ring']}, engine {report['engine']}, "
        f"{report['gpu_mem_gib']:g} GiB per GPU ({report['reserve_gib']:g} GiB reserved)",
        f"{'GiB per GPU':<22}" + "".join(f"{name:>16}" for name, _ in cols),
        f"{'seq_len':<22}" + "".join(f"{c['seq_len']:>16,}" for _, c in cols),
        f"{'tokens per GPU':<22}" + "".join(f"{c['tokens_per_gpu']:>16,}" for _, c in cols),
    ]
    for category in report["breakdown_bytes"]:
        in_gib = lambda c, k=category: c["breakdown_bytes"][k] / GIB  # noqa: E731
        lines.append(_row(f"  {category}", cols, in_gib))
    lines.append(_row("peak", cols, lambda c: c["peak_bytes_per_gpu"] / GIB))
    lines.append(f"{'  at':<22}" + "".join(f"{c['peak_at']:>16}" for _, c in cols))
    lines.append(_row("host (offloaded)", cols, lambda c: c["host_bytes_per_gpu"] / GIB))
    budget = report["budget_bytes_per_gpu"] / GIB
    verdict = "fits in" if report["fits"] else "does NOT fit in"
    line = f"data.seq_len={report['seq_len']:,} {verdict} {budget:.2f} GiB"
    if report["max_seq_len"] is not None:
        line += f"; max_seq_len={report['max_seq_len']:,} ({report['max_seq_len_limited_by']})"
    lines.append(line)
    return "\n".join(lines)


def _plan_and_write(dcfg: DictConfig) -> None:
    cfg = to_run_config(dcfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        report = make_plan(cfg)
    except PlanError as err:  # nothing fits: a user-facing answer like a bad value
        raise LongtrainError(str(err)) from err
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {run_dir / 'plan.json'} ({report['elapsed_s']} s)")


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def _main(dcfg: DictConfig) -> None:
    report_errors("plan", lambda: _plan_and_write(dcfg))


def main() -> None:
    """The command: register the schema with Hydra, then let Hydra parse the overrides."""
    register_configs()
    precheck_overrides("plan", sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
