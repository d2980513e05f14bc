"""bf16 against float32 on the demo run (`experiment=demo_cpu`: the tiny model, Ulysses over 2
CPU processes, FSDP2): the loss curves of the same seed, data and steps, step by step. Prints
a table and writes bench/results/precision_demo.json.

    python -m bench.precision_demo                       # trains both (~10-20 min on 2 cores)
    python -m bench.precision_demo --steps 20            # a shorter curve
    python -m bench.precision_demo --compare RUN_FP32 RUN_BF16   # two finished runs

float32 is the peer: the differences are bf16 minus float32 per step, and the ratio of the
mean loss over the last 20 steps (bf16 / float32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "precision_demo.json"
REPO = Path(__file__).resolve().parents[1]
TAIL = 20  # steps averaged at the end of the curve


def train(run_dir: Path, dtype: str, steps: int) -> Path:
    """The demo recipe at `dtype` into `run_dir` (as launch/demo.sh runs it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "longtrain.train", "experiment=demo_cpu", f"hydra.run.dir={run_dir}",
        f"model.dtype={dtype}", f"train.steps={steps}", "train.ckpt_every=0",
        "train.ckpt_final=false", "logging.wandb.mode=disabled", "logging.progress=false",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return run_dir


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss of a run's metrics.jsonl (evaluation lines have no `loss`)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def compare(fp32: dict[int, float], bf16: dict[int, float]) -> dict:
    """The differences of two loss curves over the steps both have."""
    steps = sorted(set(fp32) & set(bf16))
    if not steps:
        raise ValueError("the two runs share no step")
    diffs = [bf16[s] - fp32[s] for s in steps]
    tail = steps[-TAIL:]
    tail_fp32 = statistics.fmean(fp32[s] for s in tail)
    tail_bf16 = statistics.fmean(bf16[s] for s in tail)
    return {
        "steps": len(steps),
        "max_abs_diff": max(abs(d) for d in diffs),
        "mean_abs_diff": statistics.fmean(abs(d) for d in diffs),
        "mean_diff": statistics.fmean(diffs),
        "final_fp32": fp32[steps[-1]],
        "final_bf16": bf16[steps[-1]],
        f"last_{len(tail)}_mean_fp32": tail_fp32,
        f"last_{len(tail)}_mean_bf16": tail_bf16,
        "ratio_bf16_over_fp32": tail_bf16 / tail_fp32,
        "curve": [{"step": s, "fp32": fp32[s], "bf16": bf16[s]} for s in steps],
    }


def format_table(result: dict) -> str:
    rows = [(k, v) for k, v in result.items() if k != "curve"]
    lines = [f"{'bf16 vs float32, demo_cpu':<32}{'value':>12}"]
    lines += [f"{k:<32}{v:>12.4f}" if isinstance(v, float) else f"{k:<32}{v:>12}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--compare", nargs=2, metavar=("RUN_FP32", "RUN_BF16"))
    args = parser.parse_args(argv)
    if args.compare:
        fp32_dir, bf16_dir = map(Path, args.compare)
    else:
        root = Path(tempfile.mkdtemp(prefix="precision_demo-"))
        fp32_dir = train(root / "fp32", "float32", args.steps)
        bf16_dir = train(root / "bf16", "bfloat16", args.steps)
    result = {"runs": {"float32": str(fp32_dir), "bfloat16": str(bf16_dir)}}
    result.update(compare(losses(fp32_dir), losses(bf16_dir)))
    print(format_table({k: v for k, v in result.items() if k != "runs"}))
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
