"""Checkpoints that are verified before they are trusted: manifest checksums, resume=auto
skipping a corrupted checkpoint, keep_last never counting one, no checkpoint of NaN weights,
and DCP reader errors as one CheckpointError line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from longtrain.distributed import DistEnv, single_process_env
from longtrain.train import load_config, train
from longtrain.trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    interrupt_inside,
    interrupts_unwrapped,
)
from longtrain.trainer.manifest import MANIFEST, verify_checkpoint, write_manifest
from tests.spawn import spawn
from tests.test_train import SMALL, data_overrides, read_metrics, run_cli

ONE = single_process_env()


def _flip(path: Path, offset: int = 4096, count: int = 64) -> None:
    """Overwrite `count` bytes of `path` at `offset` with 0xFF, as the issue's reproduction."""
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))


def _ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _base(corpus: Path, tmp_path: Path) -> list[str]:
    return [
        *SMALL,
        *data_overrides(corpus, tmp_path / "store"),
        "model.dtype=float64",
        "optim.schedule=constant",  # the lr of a step does not depend on train.steps
        "logging.plot=false",
    ]


def test_manifest_detects_a_flipped_byte_a_truncation_and_a_missing_file(tmp_path):
    ckpt = tmp_path / "step_00000001"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "a.bin").write_bytes(bytes(range(256)) * 64)
    (ckpt / "sub" / "b.bin").write_bytes(b"x" * 100)
    manifest = write_manifest(ckpt, ONE)
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.bin"]
    assert verify_checkpoint(ckpt, ONE) is None
    _flip(ckpt / "a.bin", offset=10, count=1)
    assert "a.bin does not match its sha256" in verify_checkpoint(ckpt, ONE)
    # Sizes only (train.ckpt_checksums=false): the same-size change passes, a truncation not.
    assert verify_checkpoint(ckpt, ONE, checksums=False) is None
    (ckpt / "sub" / "b.bin").write_bytes(b"x" * 99)
    assert "sub/b.bin has 99 bytes, the manifest says 100" in verify_checkpoint(
        ckpt, ONE, checksums=False
    )
    (ckpt / "sub" / "b.bin").unlink()
    assert "sub/b.bin is missing" in verify_checkpoint(ckpt, ONE, checksums=False)
    (ckpt / MANIFEST).unlink()
    assert f"no {MANIFEST}" in verify_checkpoint(ckpt, ONE)


def _manifest_on_two_ranks(rank: int, world_size: int, ckpt: str) -> tuple[dict, str | None]:
    env = DistEnv(rank, world_size, rank, torch.device("cpu"))
    manifest = write_manifest(Path(ckpt), env)
    if rank == 1:  # rank 1 hashes files 1, 3, ...: damage one of rank 0's share after saving
        _flip(Path(ckpt) / "f0.bin", offset=0, count=1)
    torch.distributed.barrier()
    return manifest, verify_checkpoint(Path(ckpt), env)


@pytest.mark.distributed
def test_manifest_is_shared_by_the_ranks_and_their_answers_agree(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    (m0, v0), (m1, v1) = spawn(_manifest_on_two_ranks, 2, str(tmp_path))
    assert m0 == m1 and sorted(m0["files"]) == [f"f{i}.bin" for i in range(5)]
    assert m0["files"]["f3.bin"]["bytes"] == 1003
    assert v0 == v1 and "f0.bin does not match its sha256" in v0


def test_resume_auto_skips_a_corrupted_checkpoint_and_keep_last_never_counts_it(
    tmp_path, corpus, capsys
):
    base = _base(corpus, tmp_path)
    full = train(load_config([*base, "train.steps=8", "train.ckpt_final=false"]), tmp_path / "full")
    run = tmp_path / "run"
    train(load_config([*base, "train.steps=6", "train.ckpt_every=3"]), run)
    assert _ckpt_names(run) == ["step_00000003", "step_00000006"]
    _flip(run / "checkpoints" / "step_00000006" / "__0_0.distcp")  # the 64 bytes
    capsys.readouterr()
    train(load_config([*base, "train.steps=8", "train.ckpt_every=4", "train.resume=auto"]), run)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000006: __0_0.distcp does not match" in err
    # Resumed from step 3 and redid steps 3..7 exactly (float64, same arithmetic): no NaN.
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(full)]
    # keep_last=2 keeps the two newest *good* ones (4 and 8) and deletes only what is older
    # than both (3): the corrupted 6 took no good checkpoint's place.
    assert _ckpt_names(run) == ["step_00000004", "step_00000006", "step_00000008"]
    with pytest.raises(CheckpointError, match="step_00000006 fails verification"):
        Checkpointer(run, ONE, keep_last=2).resolve(str(run / "checkpoints" / "step_00000006"))


def test_resume_auto_refuses_when_no_checkpoint_verifies(tmp_path, corpus):
    base = _base(corpus, tmp_path)
    run = tmp_path / "run"
    train(load_config([*base, "train.steps=2"]), run)
    (run / "checkpoints" / "step_00000002" / "extra.pt").write_bytes(b"")
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match="no checkpoint under .* passes verification"):
        train(load_config([*base, "train.steps=4", "train.resume=auto"]), run)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_no_checkpoint_of_nonfinite_parameters(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    ckpt = Checkpointer(tmp_path, ONE, keep_last=1)
    with pytest.raises(CheckpointError, match="step 5: the parameters hold NaN or inf"):
        ckpt.save(5, model, None, None, None)
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, corpus):
    base = [*SMALL, *data_overrides(corpus, tmp_path / "store"), "logging.plot=false"]
    run = tmp_path / "run"
    train(load_config([*base, "train.steps=1"]), run)
    other = tmp_path / "other"
    shutil.copytree(run / "checkpoints", other / "checkpoints")
    proc = run_cli(
        [*base, "model.dim=64", "train.steps=2", "train.resume=auto", f"hydra.run.dir={other}"]
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot load checkpoint" in lines[0] and "step_00000001" in lines[0]
    manifest = json.loads((run / "checkpoints" / "step_00000001" / MANIFEST).read_text())
    assert manifest["hash"] == "sha256"


class _Payload:
    """What a hostile extra.pt could carry: unpickling it would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_extra_pt_is_read_without_unpickling_objects(tmp_path, corpus):
    """Our own files load as data (`weights_only=True`): an extra.pt holding an object, even
    one whose manifest was rewritten to match, is one line and its code never runs."""
    run = tmp_path / "run"
    train(load_config([*_base(corpus, tmp_path), "train.steps=1"]), run)
    ckpt = run / "checkpoints" / "step_00000001"
    # What a good extra.pt holds loads as plain data.
    extra = torch.load(ckpt / "extra.pt", weights_only=True)
    assert extra["step"] == 1 and len(extra["rng"]) == 1
    marker = tmp_path / "payload_ran"
    torch.save({**extra, "scheduler": _Payload(marker)}, ckpt / "extra.pt")
    write_manifest(ckpt, ONE)
    proc = run_cli(
        [*_base(corpus, tmp_path), "train.steps=2", "train.resume=auto", f"hydra.run.dir={run}"]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not marker.exists()
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot load checkpoint" in lines[0] and "step_00000001" in lines[0]
    assert "never unpickled" in lines[0]


class _InterruptedStream(io.BytesIO):
    """A file whose third write is hit by Ctrl-C, as a SIGINT landing inside a writer."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return super().write(data)


def _save_interrupted() -> None:
    torch.save({"a": torch.zeros(100), "b": torch.ones(50)}, _InterruptedStream())


def test_ctrl_c_inside_a_writer_surfaces_as_the_interrupt():
    # torch.save's zip writer turns the interrupt into "RuntimeError: unexpected pos" (what
    # CI saw when Ctrl-C hit a save); DCP wraps that again into a CheckpointException.
    with pytest.raises(RuntimeError, match="unexpected pos") as raw:
        _save_interrupted()
    assert interrupt_inside(raw.value)
    wrapped = CheckpointException("save", {0: (raw.value, None)})
    assert interrupt_inside(wrapped)
    with pytest.raises(KeyboardInterrupt), interrupts_unwrapped():
        _save_interrupted()
    with pytest.raises(KeyboardInterrupt), interrupts_unwrapped():
        raise wrapped
    # A writer's own failure stays what it is.
    other = CheckpointException("save", {0: (OSError("disk full"), None)})
    assert not interrupt_inside(other)
    with pytest.raises(CheckpointException), interrupts_unwrapped():
        raise other
