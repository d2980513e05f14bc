"""The trainer under torchrun with one rank hanging after a step: its peer's collective times
out after train.dist_timeout_s, the peer reports rank, step and operation and exits, and the
run ends although the stuck rank would sleep for an hour (torchrun stops it: its SIGTERM is
a request to stop at the next step boundary, longtrain.trainer.preemption, which a hung rank
never reaches, so torchrun's SIGKILL follows after its grace). Needs the trainer's
StepMonitor hooks (longtrain.train.train(step_callbacks=...), train.heartbeat_s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import write_text_corpus
from tests.launch.test_elastic import TINY

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 5  # train.dist_timeout_s: short, yet far above a tiny step's all_reduce wait
HANG_S = 3600  # the stuck rank's sleep: far past the subprocess timeout below, so a run that
# waited for it would fail the test with TimeoutExpired instead of ending


@pytest.mark.distributed
def test_hang_ends_with_a_report_naming_rank_step_and_op(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", num_docs=60)
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "NGPU": "2",
        "RUN_DIR": str(run_dir),
        "TRAIN_MODULE": "tests.launch.fault_wrapper",
        "PYTHONPATH": str(REPO),
    }
    overrides = [
        *TINY,
        f"data.source=dir:{corpus}",
        f"data.store_dir={tmp_path / 'store'}",
        f"train.dist_timeout_s={TIMEOUT_S}",
        "train.heartbeat_s=1",
    ]
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "run.sh"), "--sleep-rank", "1", "--sleep-after-step", "2",
         "--sleep-s", str(HANG_S), *overrides],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-3000:]
    # Rank 0 finished step 2 and waited for rank 1 in the step boundary's first collective
    # (whether any rank was asked to stop: longtrain.trainer.preemption).
    assert re.search(
        r"rank 0 failed at step 2 during preemption check: \w+: .*[Tt]imed? ?out", text
    ), text[-5000:]
    assert "rank 1 step 2 still running after" in text  # the stuck rank's heartbeat
    assert (run_dir / "sleep_started").is_file()  # the hang really began
