"""The run directory: one per run, the same on every rank, written by rank 0 only."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from longtrain.config import RunConfig
from longtrain.distributed import DistEnv, broadcast_object


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


def save_resolved_config(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the fully resolved config as `<run_dir>/config.yaml`."""
    path = Path(run_dir) / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    return path
