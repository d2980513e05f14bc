"""wandb through longtrain.trainer.metrics.MetricsLogger: offline runs live in the run directory,
grouped by experiment, with the config logged at start; a resumed run keeps its wandb id (its
offline runs sync into one); `disabled` and ranks other than 0 write nothing."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from longtrain.config import LoggingConfig, WandbConfig
from longtrain.trainer.metrics import MetricsLogger

RUN_CONFIG = {"train": {"steps": 3, "seed": 0}, "experiment": "ctx_sweep"}


@pytest.fixture(autouse=True)
def _wandb_stays_in_tmp(tmp_path, monkeypatch):
    # wandb keeps debug logs under the user's cache and config directories: keep them here.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _wait_for_bytes(path: Path, needles: list[bytes], timeout_s: float = 20.0) -> bytes:
    """The file's contents once every needle is in it: wandb's service process writes the
    offline record file shortly after `finish()` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes()
        if all(n in data for n in needles) or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def _log_steps(
    run_dir: Path, mode: str, steps: range, is_main: bool = True, **wandb
) -> MetricsLogger:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = LoggingConfig(wandb=WandbConfig(mode=mode, **wandb), progress=False, plot=False)
    logger = MetricsLogger(run_dir, cfg, is_main, 3, steps.start, RUN_CONFIG, "ctx_sweep")
    for step in steps:
        logger.log({"step": step, "loss": 5.0 - step, "tokens_per_s": 100.0, "note": "text"})
    return logger


def test_offline_run_is_grouped_by_experiment_and_lives_in_the_run_dir(tmp_path):
    run_dir = tmp_path / "run-a"
    logger = _log_steps(run_dir, "offline", range(3))
    run = logger.wandb_run
    assert run.group == "ctx_sweep"  # the experiment name, since logging.wandb.group is empty
    assert run.name == "run-a"  # the run directory's name
    assert dict(run.config)["train"] == {"steps": 3, "seed": 0}
    logger.close()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    records = list(offline[0].glob("run-*.wandb"))
    assert len(records) == 1  # what `wandb sync <run_dir>/wandb/offline-run-*` uploads
    data = _wait_for_bytes(records[0], [b"ctx_sweep", b'"seed"', b"loss"])
    assert b"ctx_sweep" in data and b'"seed"' in data and b"loss" in data
    assert not (tmp_path / "wandb").exists()  # nothing beside the run directory


def test_explicit_group_wins(tmp_path):
    logger = _log_steps(tmp_path / "run", "offline", range(1), group="ablation-7")
    assert logger.wandb_run.group == "ablation-7"
    logger.close()


def test_resumed_run_keeps_its_wandb_id(tmp_path):
    run_dir = tmp_path / "run"
    first = _log_steps(run_dir, "offline", range(2))
    first_id = first.wandb_run.id
    first.close()
    second = _log_steps(run_dir, "offline", range(1, 3))  # resumed after step 0
    assert second.wandb_run.id == first_id
    second.close()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    # One offline directory per start, all with the same id: `wandb sync` joins them.
    assert len(offline) == 2, offline
    assert all(re.fullmatch(rf"offline-run-[\d_]+-{first_id}(-\d+)?", p.name) for p in offline)


@pytest.mark.parametrize("case", ["disabled", "not_rank_0"])
def test_disabled_and_other_ranks_write_no_wandb_files(tmp_path, case):
    run_dir = tmp_path / "run"
    if case == "disabled":
        logger = _log_steps(run_dir, "disabled", range(3))
    else:
        logger = _log_steps(run_dir, "offline", range(3), is_main=False)
    assert logger.wandb_run is None
    logger.close()
    assert not (run_dir / "wandb").exists()
    assert not (tmp_path / "cache" / "wandb").exists()
    expected = ["metrics.jsonl"] if case == "disabled" else []
    assert sorted(p.name for p in run_dir.iterdir()) == expected
