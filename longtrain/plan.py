"""`python -m longtrain.plan [overrides]`: what one GPU of the configured run will hold, and the
longest sequence that fits, before launching anything.

Takes the same overrides as `longtrain.train` plus the `plan` group (`longtrain.config`):
    python -m longtrain.plan experiment=llama3_8b_1m_sp8
    python -m longtrain.plan experiment=llama3_8b_1m_sp8 parallel.ulysses=4 plan.gpu_mem_gib=40

Simulates one training step on fake tensors at the target world size (`longtrain.planner`),
prints the peak per GPU by category, and the host memory per GPU, for `data.seq_len` (at the
configured offload) and for the longest seq_len that fits both `plan.gpu_mem_gib` (less
`plan.reserve_gib`) and the node's host memory (`plan.host_mem_gib` over
`plan.gpus_per_node` GPUs), at the offload split the planner picks (the overrides to run it
are printed), and writes `<run_dir>/plan.json` with at least `peak_bytes_per_gpu`,
`host_bytes_per_gpu`, `max_seq_len` and `at_max_seq_len`. Exit status 0 with a plan (whether
data.seq_len fits is in `fits`), 2 when nothing fits or the config is invalid (the message
says what to change).
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
        "host_breakdown_bytes": m.host_breakdown,
        "offloaded_blocks": m.offloaded_blocks,
    }


def run_overrides(m: StepMemory) -> str:
    """The overrides that run the plan's answer: its length and its offload split."""
    return f"data.seq_len={m.seq_len} train.memory.offload_activations={m.offloaded_blocks}"


def make_plan(cfg) -> dict:
    """Simulate `cfg` (a config with `.plan`) and return the plan.json content."""
    plan: PlanConfig = cfg.plan
    t0 = time.perf_counter()
    budget = budget_bytes(plan.gpu_mem_gib, plan.reserve_gib)
    with Planner(cfg, plan) as planner:
        configured = planner.measure(cfg.data.seq_len)
        gpu_fits = configured.peak_bytes <= budget
        host_fits = configured.host_bytes <= planner.host_budget
        report = {
            **_point(configured),
            "fits": gpu_fits and host_fits,
            "fits_gpu": gpu_fits,
            "fits_host": host_fits,
            "budget_bytes_per_gpu": budget,
            "host_budget_bytes_per_gpu": planner.host_budget,
            "gpu_mem_gib": plan.gpu_mem_gib,
            "reserve_gib": plan.reserve_gib,
            "host_mem_gib": plan.host_mem_gib,
            "gpus_per_node": planner.gpus_per_node,
            "device": plan.device,
            "kernels": planner.kernels,
            "assumptions": planner.describe_assumptions(),
            "model": cfg.model.name,
            "model_dtype": cfg.model.dtype,
            "n_layers": planner.n_layers,
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
            report["run_overrides"] = run_overrides(found.at_max)
            report["evaluations"] = [
                {
                    "seq_len": f.seq_len,
                    "offloaded_blocks": f.at.offloaded_blocks,
                    "peak_bytes_per_gpu": f.at.peak_bytes,
                    "host_bytes_per_gpu": f.at.host_bytes,
                    "fits": f.fits,
                }
                for f in found.evaluations
            ]
        else:
            report["max_seq_len"] = None
    report["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return report


def _row(name: str, cols, value) -> str:
    return f"{name:<34}" + "".join(f"{value(c):>18.2f}" for _, c in cols)


def _text_row(name: str, cols, value) -> str:
    return f"{name:<34}" + "".join(f"{value(c):>18}" for _, c in cols)


def format_table(report: dict) -> str:
    """The breakdown per GPU (device and host) for data.seq_len and for max_seq_len."""
    cols = [("data.seq_len", report)]
    if report.get("at_max_seq_len"):
        cols.append(("max_seq_len", report["at_max_seq_len"]))
    lay = report["layout"]
    lines = [
        f"plan: {report['model']} ({report['model_dtype']}) on {report['world_size']} GPU(s) = "
        f"dp={lay['dp']} x ulysses={lay['ulysses']} x ring={lay['ring']}, engine "
        f"{report['engine']}, {report['gpu_mem_gib']:g} GiB per GPU ({report['reserve_gib']:g} "
        f"GiB reserved)",
        report["assumptions"],
        f"{'GiB per GPU':<34}" + "".join(f"{name:>18}" for name, _ in cols),
        _text_row("seq_len", cols, lambda c: f"{c['seq_len']:,}"),
        _text_row("tokens per GPU", cols, lambda c: f"{c['tokens_per_gpu']:,}"),
        _text_row(
            "blocks offloaded", cols, lambda c: f"{c['offloaded_blocks']} / {report['n_layers']}"
        ),
    ]
    for category in report["breakdown_bytes"]:
        in_gib = lambda c, k=category: c["breakdown_bytes"][k] / GIB  # noqa: E731
        lines.append(_row(f"  {category}", cols, in_gib))
    lines.append(_row("peak (GPU)", cols, lambda c: c["peak_bytes_per_gpu"] / GIB))
    lines.append(_text_row("  at", cols, lambda c: c["peak_at"]))
    for part in report["host_breakdown_bytes"]:
        in_gib = lambda c, k=part: c["host_breakdown_bytes"].get(k, 0) / GIB  # noqa: E731
        lines.append(_row(f"  host: {part}"[:34], cols, in_gib))
    lines.append(_row("host", cols, lambda c: c["host_bytes_per_gpu"] / GIB))
    budget = report["budget_bytes_per_gpu"] / GIB
    host_budget = report["host_budget_bytes_per_gpu"] / GIB
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines.append(
        f"data.seq_len={report['seq_len']:,} {verdict} (budgets per GPU: {budget:.2f} GiB GPU, "
        f"{host_budget:.2f} GiB host = plan.host_mem_gib={report['host_mem_gib']:g} / "
        f"{report['gpus_per_node']})"
    )
    if report["max_seq_len"] is not None:
        lines.append(
            f"max_seq_len={report['max_seq_len']:,} (limited by "
            f"{report['max_seq_len_limited_by']}); run it with: {report['run_overrides']}"
        )
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
