"""The run directory: one per run, the same on every rank, written by rank 0 only."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from longtrain.config import RunConfig
from longtrain.distributed import DistEnv, broadcast_object
from longtrain.errors import LongtrainError


class RunDirError(LongtrainError):
    """The run directory holds another run that starting here would mix with or erase."""


def agree_run_dir(run_dir: Path, env: DistEnv) -> Path:
    """Rank 0's run directory on every rank.

    Hydra names the default directory after the start time, which can differ by a second
    between ranks; the ranks that disagree drop the (empty) directory Hydra made for them.
    """
    chosen = Path(broadcast_object(str(Path(run_dir).resolve()), env))
    mine = Path(run_dir).resolve()
    if mine != chosen and mine.is_dir() and not any(mine.iterdir()):
        mine.rmdir()
    if env.is_main:
        chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def _is_run_config(path: Path) -> bool:
    """Whether `path` is a config.yaml that a run wrote (a resolved RunConfig)."""
    try:
        saved = OmegaConf.load(path)
    except Exception:  # any YAML or read error: not ours
        return False
    return isinstance(saved, DictConfig) and {"model", "data", "train"} <= set(saved.keys())


def _holds_a_run(run_dir: Path) -> str | None:
    """What in `run_dir` belongs to an earlier run (metrics, checkpoints), or is someone
    else's file that a run would overwrite (config.yaml, metrics.png); None if nothing."""
    if not run_dir.is_dir():
        return None
    found = []
    metrics = run_dir / "metrics.jsonl"
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    if has_metrics:
        found.append(f"{metrics.name} with {len(metrics.read_text().splitlines())} lines")
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        steps = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
        if steps:
            found.append(f"checkpoints {', '.join(steps[-3:])}")
    foreign = []
    if (run_dir / "config.yaml").is_file() and not _is_run_config(run_dir / "config.yaml"):
        foreign.append("config.yaml")
    if (run_dir / "metrics.png").exists() and not has_metrics:  # a run draws it from metrics
        foreign.append("metrics.png")
    if foreign:
        found.append(f"files a run would overwrite but did not write: {', '.join(foreign)}")
    return " and ".join(found) or None


def check_run_dir(run_dir: Path, resume: str, env: DistEnv) -> None:
    """Refuse to start a new run (`resume` none) in a directory that holds another run's
    metrics or checkpoints (it would truncate their metrics and later resume from their
    checkpoints) or someone else's file of a name a run writes. Files of other names may
    stay beside a run (launchers' logs, notes). Collective:
    every rank raises the same RunDirError."""
    held = _holds_a_run(Path(run_dir)) if env.is_main and resume == "none" else None
    held = broadcast_object(held, env)
    if held:
        raise RunDirError(
            f"run directory {run_dir} already holds {held}; continue a run there with "
            "train.resume=auto, or start this one in another hydra.run.dir (nothing was changed)"
        )


def save_resolved_config(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the fully resolved config as `<run_dir>/config.yaml`."""
    path = Path(run_dir) / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    return path
