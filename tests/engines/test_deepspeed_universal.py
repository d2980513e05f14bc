"""A DeepSpeed checkpoint resumes on another world size through DeepSpeed's universal format
(`python -m longtrain.convert.ds_universal`, then `train.resume=auto`): 4 ranks at ZeRO-2,
resumed on 2 at ZeRO-1, float64, under torchrun; the continued losses equal an
uninterrupted run's. Without a conversion, and for ZeRO-3, the resume is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from longtrain.distributed.deepspeed_zero import (
    STATE_MARKER,
    UNIVERSAL_DIR,
    DeepSpeedRun,
    LayoutError,
)
from longtrain.trainer.manifest import verify_checkpoint

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
    "train.steps=4",
    "train.ckpt_every=2",
    "train.keep_last=0",
    "train.engine=deepspeed",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
    "logging.plot=false",
]
# DeepSpeed reduces gradients and their norm in float32 whatever the parameter dtype (see
# test_deepspeed.py), so the clip coefficient's rounding depends on the world size: the
# step after the resume moves the loss by ~1e-11 relative (seen 2.7e-11 at ZeRO-2 -> 2,
# 9e-12 at ZeRO-1 -> 1); a lost or misread optimizer state moves it by 1e-6 or more.
LOSS_RTOL = 1e-8


def _torchrun(nproc: int, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "longtrain.train", *TINY, *overrides,
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)


def _losses(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.distributed
@pytest.mark.skipif(find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_four_ranks_at_zero2_resume_on_two_at_zero1_through_the_universal_format(tmp_path, corpus):
    from longtrain.convert.ds_universal import convert_to_universal

    data = [f"data.source=dir:{corpus}", f"data.store_dir={tmp_path / 'store'}"]
    full = tmp_path / "full"
    ran = _torchrun(4, full, *data, "train.deepspeed.zero_stage=2")
    assert ran.returncode == 0, ran.stderr[-3000:]
    expected = _losses(full)

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000004")  # as if stopped after step 2
    ckpt = cut / "checkpoints" / "step_00000002"
    saved = {p: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    out = convert_to_universal(cut, workers=1)
    assert out == ckpt / UNIVERSAL_DIR and (out / "zero").is_dir()
    assert {p: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == saved  # read only
    from longtrain.distributed import single_process_env

    assert verify_checkpoint(out, single_process_env()) is None  # complete, with a manifest
    assert not (ckpt / f"{UNIVERSAL_DIR}.tmp").exists()

    resumed = _torchrun(2, cut, *data, "train.deepspeed.zero_stage=1", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt} at step 2" in resumed.stdout
    got = _losses(cut)
    assert got[:2] == expected[:2]  # the lines before the resume are kept as they were
    assert got[2:] == pytest.approx(expected[2:], rel=LOSS_RTOL, abs=0)


class _NoEngine:
    """Stands in for DeepSpeed's engine where the layout check refuses before using it."""

    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError("the layout check should have refused before loading")


def _marker(path: Path, world_size: int, zero_stage: int) -> Path:
    path.mkdir()
    layout = {"world_size": world_size, "zero_stage": zero_stage}
    (path / STATE_MARKER).write_text(json.dumps(layout))
    return path


def test_another_layout_without_a_conversion_is_one_line_naming_the_command(tmp_path):
    ckpt = _marker(tmp_path / "step_00000002", world_size=4, zero_stage=2)
    run = DeepSpeedRun(_NoEngine(), world_size=2, zero_stage=1)
    with pytest.raises(LayoutError) as err:
        run.load(ckpt)
    message = str(err.value)
    assert "saved by DeepSpeed with 4 ranks at ZeRO-2; this run has 2 ranks at ZeRO-1" in message
    assert f"python -m longtrain.convert.ds_universal {ckpt}" in message


@pytest.mark.parametrize(("saved", "now"), [(3, 3), (2, 3), (3, 1)])
def test_zero3_on_either_side_of_a_layout_change_is_refused(tmp_path, saved, now):
    ckpt = _marker(tmp_path / "step_00000002", world_size=4, zero_stage=saved)
    (ckpt / UNIVERSAL_DIR).mkdir()  # even with a conversion there
    run = DeepSpeedRun(_NoEngine(), world_size=2, zero_stage=now)
    with pytest.raises(LayoutError, match="does not restore ZeRO-3 exactly"):
        run.load(ckpt)
