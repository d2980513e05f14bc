"""A picture of a run: loss and throughput against step, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes
import matplotlib.pyplot as plt


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Write a two-panel PNG (loss; tokens/s) against optimizer step; returns its path."""
    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], color="tab:blue", lw=1.2)
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
