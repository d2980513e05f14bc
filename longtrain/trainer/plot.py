"""A picture of a run: loss and throughput against step, from metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes
import matplotlib.pyplot as plt

SUPERSEDED = "metrics.superseded.jsonl"  # lines of steps a resumed run redid, kept here


def _parse(path: Path) -> tuple[list[dict], str | None]:
    """(records, torn last line or None) of a metrics.jsonl file.

    A crash in the middle of a write can leave the last line cut short: it is returned apart
    instead of failing. A bad line anywhere else raises ValueError naming the file and line."""
    lines = Path(path).read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records, torn = [], None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines):
                raise ValueError(
                    f"{path} line {i} is not JSON ({err}): the file was edited or damaged; "
                    "repair or remove that line"
                ) from err
            torn = line
    return records, torn


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order (a torn last line is left out)."""
    return _parse(path)[0]


def supersede_after(path: Path, start_step: int) -> list[dict]:
    """Prepare `path` for a run that continues at `start_step`: lines of steps >= start_step
    (they will be redone) and a torn last line move to metrics.superseded.jsonl beside it, so
    nothing is lost; returns the records kept. A missing file is left missing."""
    path = Path(path)
    if not path.exists():
        return []
    records, torn = _parse(path)
    kept = [r for r in records if r["step"] < start_step]
    moved = [json.dumps(r) + "\n" for r in records if r["step"] >= start_step]
    if torn is not None:
        moved.append(json.dumps({"torn_line": torn}) + "\n")
    if moved:
        with open(path.with_name(SUPERSEDED), "a") as f:
            f.writelines(moved)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept


def plot_metrics(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Write a two-panel PNG (train and eval loss; tokens/s) against optimizer step; returns
    its path."""
    everything = read_metrics(metrics_path)
    records = [r for r in everything if "loss" in r]  # training lines
    evals = [r for r in everything if "eval_loss" in r]
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], color="tab:blue", lw=1.2, label="train")
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            color="tab:orange",
            marker="o",
            lw=1.2,
            label="eval (held out)",
        )
        ax_loss.legend()
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_tps.plot(steps, [r["tokens_per_s"] for r in records], color="tab:green", lw=1.2)
    ax_tps.set_ylabel("trained tokens / s")
    ax_tps.set_xlabel("optimizer step")
    ax_tps.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def plot_loss_by_position(metrics_path: Path, png_path: Path) -> Path | None:
    """Write the loss by position in the document, one curve per evaluation (later ones
    darker), log-scaled positions; returns its path, or None without evaluations."""
    evals = [r for r in read_metrics(metrics_path) if "loss_by_position" in r]
    if not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(evals):
        points = [(int(k), v) for k, v in r["loss_by_position"].items() if v is not None]
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        color = cmap(0.15 + 0.7 * i / max(1, len(evals) - 1))
        ax.plot(xs, ys, marker="o", lw=1.2, color=color, label=f"step {r['step']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document (bucket upper bound, tokens)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    if len(evals) <= 12:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
