"""train.ckpt_async=true: DCP's async_save stages the state to host memory and writes it while
training goes on; a checkpoint becomes visible (renamed from .tmp) only once complete, at the
next save or at the end of the run, and holds exactly what a synchronous save holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longtrain.train import load_config, train
from tests.test_train import SMALL, data_overrides, read_metrics, run_cli


def _base(corpus: Path, tmp_path: Path) -> list[str]:
    return [
        *SMALL,
        *data_overrides(corpus, tmp_path / "store"),
        "model.dtype=float64",
        "train.steps=6",
        "train.ckpt_every=2",
        "train.keep_last=0",
        "logging.plot=false",
    ]


def _saved_model(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint's model, read without building the model."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent.parent / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=True)["model"]


def _names(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_async_checkpoints_hold_what_sync_ones_hold_and_appear_only_when_complete(tmp_path, corpus):
    base = _base(corpus, tmp_path)
    sync = train(load_config(base), tmp_path / "sync")
    seen = {}

    def look(step: int, record: dict) -> None:
        seen[step] = _names(tmp_path / "async")

    run = train(load_config([*base, "train.ckpt_async=true"]), tmp_path / "async", [look])
    # After step 1 the save of step 2 is in flight: only its .tmp exists. The save of step 4
    # completes it first; the end of the run completes the last.
    assert seen[1] == ["step_00000002.tmp"]
    assert seen[3] == ["step_00000002", "step_00000004.tmp"]
    assert _names(run) == _names(sync) == ["step_00000002", "step_00000004", "step_00000006"]
    for name in _names(sync):
        want, got = (
            _saved_model(sync / "checkpoints" / name),
            _saved_model(run / "checkpoints" / name),
        )
        assert want.keys() == got.keys()
        for key in want:
            # Staged before the next optimizer step changed the parameters: the same bits.
            assert torch.equal(got[key], want[key]), (name, key)
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(sync)]

    # A resume from an asynchronous checkpoint continues exactly.
    resumed = train(
        load_config(
            [*base, "train.ckpt_async=true", f"train.resume={run / 'checkpoints/step_00000004'}"]
        ),
        tmp_path / "resumed",
    )
    tail = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert tail == {r["step"]: r["loss"] for r in read_metrics(sync) if r["step"] >= 4}


@pytest.mark.distributed
def test_async_saves_over_two_ranks_complete_and_resume(tmp_path, corpus):
    base = _base(corpus, tmp_path)
    one = train(load_config(base), tmp_path / "one")
    two = tmp_path / "two"
    proc = run_cli([*base, "train.ckpt_async=true", f"hydra.run.dir={two}"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _names(two) == ["step_00000002", "step_00000004", "step_00000006"]
    for a, b in zip(read_metrics(two), read_metrics(one)):
        # float64, dp 2 against one process: reassociated sums only (1e-9, DESIGN.md).
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9, abs=0)
    want, got = (
        _saved_model(one / "checkpoints/step_00000006"),
        _saved_model(two / "checkpoints/step_00000006"),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-12)


def test_async_with_deepspeed_is_one_line(tmp_path, corpus):
    proc = run_cli(
        [*_base(corpus, tmp_path), "train.engine=deepspeed", "train.ckpt_async=true",
         f"hydra.run.dir={tmp_path / 'ds'}"]
    )  # fmt: skip
    assert proc.returncode == 2
    assert "train.ckpt_async=true needs train.engine=fsdp2 or none" in proc.stderr
    assert "Traceback" not in proc.stderr
