"""What a checkpoint save costs the training loop, synchronous against `train.ckpt_async=true`,
on the same run (same model, data and steps; the two runs interleaved, repeated). Prints a
table, writes bench/results/ckpt_save.json.

    python -m bench.ckpt_save            # ~3 min on 2 cores
    python -m bench.ckpt_save --quick

The cost of a save is the wall time between the ends of two steps when a save happened in
between, less the median of that time over the steps without one: what the loop waited. With
async saves the state is staged to host memory in the loop and written by a thread; the
completion of the previous save (extra.pt, manifest hashes, rename) also runs in the loop, at
the next save.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import write_results

RESULTS = Path(__file__).resolve().parent / "results" / "ckpt_save.json"


def _overrides(
    steps: int, every: int, dim: int, layers: int, store: Path, corpus: Path
) -> list[str]:
    return [
        "model=tiny",
        f"model.dim={dim}",
        f"model.n_layers={layers}",
        "model.n_heads=8",
        "model.n_kv_heads=4",
        f"model.ffn_dim={dim * 8 // 3 // 64 * 64}",
        "model.dtype=float32",
        "data.seq_len=512",
        f"data.source=dir:{corpus}",
        f"data.store_dir={store}",
        "train.global_batch=2",
        f"train.steps={steps}",
        f"train.ckpt_every={every}",
        "train.keep_last=1",
        "train.ckpt_checksums=true",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        "logging.plot=false",
    ]


def _one_run(overrides: list[str], run_dir: Path, every: int) -> dict:
    from longtrain.train import load_config, train

    ends: list[float] = []
    train(load_config(overrides), run_dir, [lambda step, record: ends.append(time.perf_counter())])
    # gaps[j]: from the end of step j to the end of step j + 1, which holds step j + 1 and
    # the save after it when j + 2 steps done is a multiple of `every`.
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    with_save = [g for j, g in enumerate(gaps) if (j + 2) % every == 0]
    without = [g for j, g in enumerate(gaps) if (j + 2) % every != 0]
    base = statistics.median(without)
    return {"step_s": base, "save_cost_s": statistics.median(with_save) - base}


def main(argv: list[str] | None = None) -> dict:
    from tests.fixtures import write_text_corpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    # Large enough that writing a checkpoint (parameters + AdamW, float32) takes seconds.
    steps, every, dim, layers, repeats = (9, 3, 256, 4, 1) if args.quick else (12, 3, 768, 8, 2)
    rows = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_text_corpus(root / "corpus", num_docs=200, seed=0)
        base = _overrides(steps, every, dim, layers, root / "store", corpus)
        for r in range(repeats):
            for mode in ("sync", "async"):
                extra = ["train.ckpt_async=true"] if mode == "async" else []
                rows[mode].append(_one_run([*base, *extra], root / f"{mode}{r}", every))
    summary = {
        mode: {
            "step_s": statistics.median(x["step_s"] for x in runs),
            "save_cost_s": statistics.median(x["save_cost_s"] for x in runs),
        }
        for mode, runs in rows.items()
    }
    ratio = summary["async"]["save_cost_s"] / summary["sync"]["save_cost_s"]
    print(f"{'save':<8}{'step s':>10}{'save cost s':>14}")
    for mode, x in summary.items():
        print(f"{mode:<8}{x['step_s']:>10.3f}{x['save_cost_s']:>14.3f}")
    print(f"async / sync save cost: {ratio:.2f}")
    result = {
        "model": f"dim {dim}, {layers} layers, float32, one process, 512 tokens x 2",
        "every": every,
        "runs": rows,
        "summary": summary,
        "async_over_sync_save_cost": ratio,
    }
    write_results(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
