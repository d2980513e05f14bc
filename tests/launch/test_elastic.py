"""Elastic restart: under `launch/run.sh` with MAX_RESTARTS=1, a rank killed mid-run makes
torchrun restart the group, which resumes from the newest complete checkpoint; the final
per-step losses equal those of an uninterrupted run exactly (2 gloo processes, float64)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import write_text_corpus

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "model.dtype=float64",
    "data.seq_len=64",
    "train.global_batch=4",
    "train.steps=8",
    "train.ckpt_every=2",
    "train.keep_last=0",
    "optim.warmup_steps=2",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
    "logging.plot=false",
]


def _launch(
    run_dir: Path, overrides: list[str], *fault: str, restarts: int
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "NGPU": "2",
        "MAX_RESTARTS": str(restarts),
        "RUN_DIR": str(run_dir),
        "TRAIN_MODULE": "tests.launch.fault_wrapper",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        ["bash", str(REPO / "launch" / "run.sh"), *fault, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The uninterrupted run both faults are compared with: (overrides, its losses)."""
    root = tmp_path_factory.mktemp("elastic")
    corpus = write_text_corpus(root / "corpus", num_docs=60)
    overrides = [*TINY, f"data.source=dir:{corpus}", f"data.store_dir={root / 'store'}"]
    proc = _launch(root / "clean", overrides, restarts=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _losses(root / "clean")
    assert [s for s, _ in expected] == list(range(8))
    return overrides, expected


@pytest.mark.distributed
def test_killed_rank_restarts_and_resumes_exactly(tmp_path, clean):
    overrides, expected = clean
    faulty_dir = tmp_path / "faulty"
    faulty = _launch(
        faulty_dir, overrides, "--kill-rank", "1", "--kill-after-step", "4", restarts=1
    )
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    # The fault happened, torchrun restarted the group once, and the restart resumed from the
    # checkpoint after 4 steps (step 4 was logged, then rank 1 died before step 5).
    assert (faulty_dir / "attempts.txt").read_text() == "attempt 0\nattempt 1\n"
    assert "fault_wrapper: SIGKILL after step 4" in faulty.stdout
    restarted = list(faulty_dir.glob("logs/*/attempt_1/0/stdout.log"))
    assert len(restarted) == 1
    assert "step_00000004 at step 4" in restarted[0].read_text()

    # Same layout, same arithmetic after an exact restore: equal to the last bit.
    assert _losses(faulty_dir) == expected


@pytest.mark.distributed
def test_a_rank_killed_while_writing_a_checkpoint_leaves_the_previous_one_to_resume(
    tmp_path, clean
):
    """Rank 1 dies after writing its shards of step 6's checkpoint, before it is complete:
    the half-written directory is never taken; the restart resumes from step 4's."""
    overrides, expected = clean
    faulty_dir = tmp_path / "faulty"
    faulty = _launch(
        faulty_dir, overrides, "--kill-rank", "1", "--kill-during-save", "6", restarts=1
    )
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert "fault_wrapper: SIGKILL during the save of step 6" in faulty.stdout
    restarted = list(faulty_dir.glob("logs/*/attempt_1/0/stdout.log"))
    assert len(restarted) == 1
    assert "step_00000004 at step 4" in restarted[0].read_text()
    # The restart wrote step 6 again, whole; nothing half-written is left.
    names = sorted(p.name for p in (faulty_dir / "checkpoints").iterdir())
    assert names == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    assert _losses(faulty_dir) == expected
