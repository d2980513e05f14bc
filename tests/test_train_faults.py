"""What a run does when something goes wrong: non-finite losses, a run directory that holds
another run, a torn metrics line, Ctrl-C. Nothing is lost and nothing goes on silently."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longtrain.errors import NonFiniteError
from longtrain.train import load_config, train
from longtrain.trainer.plot import SUPERSEDED
from longtrain.trainer.run_dir import RunDirError
from tests.test_train import REPO, SMALL, data_overrides, read_metrics

# optim.lr=1e6 from the first step: the reproduction (NaN from step 2, exit 0).
EXPLODE = ["optim.lr=1e6", "optim.warmup_steps=0", "train.ckpt_every=1", "train.keep_last=1"]


@pytest.fixture
def base(tmp_path, corpus) -> list[str]:
    return [*SMALL, *data_overrides(corpus, tmp_path / "store"), "logging.plot=false"]


def _saved_parameters(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint, read without building the model."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)["model"]


def test_a_nonfinite_step_stops_the_run_and_no_nan_checkpoint_is_kept(tmp_path, base):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step \d+: the loss is .* gradient norm") as err:
        train(load_config([*base, *EXPLODE, "train.steps=8"]), run)
    assert "train.skip_nonfinite=true" in str(err.value)
    records = read_metrics(run)
    assert [r["skipped"] for r in records] == [False] * (len(records) - 1) + [True]
    assert len(records) < 8  # stopped at the first non-finite step
    (newest,) = sorted((run / "checkpoints").iterdir())  # keep_last=1 kept the good one
    assert newest.name == f"step_{len(records) - 1:08d}"
    params = _saved_parameters(newest)
    assert params and all(torch.isfinite(t).all() for t in params.values())


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path, base):
    run = tmp_path / "run"
    train(load_config([*base, *EXPLODE, "train.steps=5", "train.skip_nonfinite=true"]), run)
    records = read_metrics(run)
    skipped = [r["skipped"] for r in records]
    assert len(records) == 5 and any(skipped) and not skipped[0]
    assert [r["skipped_steps"] for r in records] == [sum(skipped[: i + 1]) for i in range(5)]
    # Every kept checkpoint holds finite weights: a skipped step leaves them as they were.
    for ckpt in sorted((run / "checkpoints").iterdir()):
        assert all(torch.isfinite(t).all() for t in _saved_parameters(ckpt).values())


def test_a_run_directory_of_another_run_is_refused_and_left_as_it_was(tmp_path, base):
    run = tmp_path / "run"
    train(load_config([*base, "train.steps=2"]), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    held = "already holds metrics.jsonl with 2 lines and checkpoints step_00000002; continue"
    with pytest.raises(RunDirError, match=held):
        train(load_config([*base, "train.steps=3"]), run)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    train(load_config([*base, "train.steps=3", "train.resume=auto"]), run)
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]


def test_someone_elses_config_yaml_is_never_overwritten(tmp_path, base):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.yaml").write_text("my own config\n")
    (run / "metrics.png").write_bytes(b"my picture")
    with pytest.raises(RunDirError, match="would overwrite but did not write: config.yaml, metr"):
        train(load_config([*base, "train.steps=1"]), run)
    assert (run / "config.yaml").read_text() == "my own config\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.png"]


def test_a_torn_metrics_line_does_not_block_resume_and_is_kept_aside(tmp_path, base):
    run = tmp_path / "run"
    train(load_config([*base, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0"]), run)
    # A crash while writing step 4's line, before its checkpoint: the newest checkpoint is
    # step 2, and metrics.jsonl ends in steps 2 and 3 (to be redone) and a torn line.
    for ckpt in (run / "checkpoints").glob("step_00000004"):
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1')  # torn: no end, no newline
    train(load_config([*base, "train.steps=5", "train.resume=auto"]), run)
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3, 4]
    kept_aside = [json.loads(line) for line in (run / SUPERSEDED).read_text().splitlines()]
    assert [r.get("step") for r in kept_aside] == [2, 3, None]
    assert kept_aside[-1] == {"torn_line": '{"step": 4, "loss": 3.1'}


def test_a_damaged_metrics_line_in_the_middle_is_named(tmp_path, base):
    run = tmp_path / "run"
    train(load_config([*base, "train.steps=2", "train.ckpt_every=1", "train.keep_last=0"]), run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 1 is not JSON"):
        train(load_config([*base, "train.steps=3", "train.resume=auto"]), run)


def test_ctrl_c_is_one_line_naming_the_step_and_checkpoint(tmp_path, base):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "longtrain.train", *base, "train.steps=100000"]
    cmd += ["train.ckpt_every=1", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        metrics = run / "metrics.jsonl"
        # Wait (by events, not by a clock budget) until two steps are logged; the deadline
        # only keeps a broken start from hanging the suite.
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run logged no two steps"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if "interrupted" in x]
    assert line.startswith("longtrain.train: interrupted during step ")
    assert "train.resume=auto" in line and "step_0000000" in line
    named = Path(line.split("resume from checkpoint ")[1].split(" with ")[0])
    assert (named / "manifest.json").is_file()
