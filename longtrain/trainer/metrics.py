"""Per-step metrics: metrics.jsonl (every step), a tqdm line and wandb (rank 0 only)."""

from __future__ import annotations

import json
import resource
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from longtrain.config import LoggingConfig
from longtrain.trainer.plot import plot_loss_by_position, plot_metrics, supersede_after

# Dense bf16 peak TFLOP/s per device, for MFU when train.peak_tflops is not given.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops(device: torch.device, configured: float) -> float:
    """`configured` if set, else the bf16 peak of a known GPU, else 0 (MFU not reported)."""
    if configured > 0 or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), 0.0)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocator peak on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class MetricsLogger:
    """Writes one JSON object per optimizer step. Inert on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        is_main: bool,
        total_steps: int,
        start_step: int,
        run_config: dict,
        experiment: str,
        log_every: int = 1,
    ) -> None:
        self.is_main = is_main
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.png_path = self.run_dir / "metrics.png"
        self.wandb_run = None
        self.bar = None
        self.file = None
        self.log_every = max(1, log_every)  # console postfix and wandb; the file gets every step
        self.skipped_steps = 0  # steps whose update was skipped (non-finite), this run so far
        if not is_main:
            return
        kept = supersede_after(self.path, start_step)
        self.skipped_steps = sum(bool(r.get("skipped")) for r in kept)
        self.file = open(self.path, "a")  # noqa: SIM115  (open for the whole run; closed in close())
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.wandb.mode != "disabled":
            self.wandb_run = _init_wandb(self.run_dir, cfg, run_config, experiment)

    def log(self, record: dict) -> None:
        """Append `record` (one step's metrics) and count a skipped update in it."""
        if not self.is_main:
            return
        self.skipped_steps += bool(record.get("skipped"))
        record["skipped_steps"] = self.skipped_steps
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record["step"] % self.log_every:
            if self.bar is not None:
                self.bar.update(1)
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False
            )
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))},
                step=record["step"],
            )

    def log_eval(self, record: dict) -> None:
        """Append an evaluation line (`longtrain.trainer.evaluate`) and send it to wandb."""
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.write(
                f"step {record['step']}: eval_loss {record['eval_loss']:.4f} over "
                f"{record['eval_tokens']} tokens"
            )
        if self.wandb_run is not None:
            values = {"eval_loss": record["eval_loss"], "eval_tokens": record["eval_tokens"]}
            for bucket, loss in record["loss_by_position"].items():
                if loss is not None:
                    values[f"loss_by_position/{bucket}"] = loss
            self.wandb_run.log(values, step=record["step"])

    def close(self, draw_plot: bool = True) -> Path | None:
        """Close the file, finish wandb and draw the plot; returns the PNG path (rank 0).
        Safe to call twice (the second call does nothing)."""
        if not self.is_main or self.file is None:
            return None
        self.file.close()
        self.file = None
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if draw_plot and self.cfg.plot and self.path.stat().st_size > 0:
            plot_loss_by_position(self.path, self.run_dir / "loss_by_position.png")
            return plot_metrics(self.path, self.png_path, title=self.run_dir.name)
        return None


def _init_wandb(run_dir: Path, cfg: LoggingConfig, run_config: dict, experiment: str):
    import wandb

    # A stable id derived from the run directory lets a resumed run continue the same run.
    run_id = f"lt-{zlib.crc32(str(run_dir.resolve()).encode()):08x}"
    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity or None,
        group=cfg.wandb.group or experiment,
        name=cfg.wandb.name or run_dir.name,
        id=run_id,
        resume="allow",
        mode=cfg.wandb.mode,
        dir=str(run_dir),
        config=run_config,
    )
