"""longtrain/check.py: a config is composed as the trainer composes it and checked for N ranks
without data or processes; every mistake is one line (exit 2 on the command line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.check import check_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("overrides", "world_size", "line"),
    [
        ([], 1, "1 process = dp=1 x ulysses=1 x ring=1 (parallel=none), model=tiny, "
                "data.seq_len=512, train.global_batch=8, train.steps=100"),
        (["experiment=demo_cpu", "parallel.ulysses=2"], 4,
         "4 processes = dp=2 x ulysses=2 x ring=1 (parallel=ulysses), model=tiny, "
         "data.seq_len=1024, train.global_batch=8, train.steps=120"),
        (["parallel=usp", "data.seq_len=1024"], 8,
         "8 processes = dp=1 x ulysses=2 x ring=4 (parallel=usp), model=tiny, "
         "data.seq_len=1024, train.global_batch=8, train.steps=100"),
        # Data is never read: a source and store that do not exist here still check.
        (["data.source=dir:/no/such dir", "data.store_dir=/no/such/store"], 2,
         "2 processes = dp=2 x ulysses=1 x ring=1 (parallel=none), model=tiny, "
         "data.seq_len=512, train.global_batch=8, train.steps=100"),
    ],
)  # fmt: skip
def test_ok_line_shows_the_grid(overrides, world_size, line):
    assert check_config(overrides, world_size) == f"config ok: {line}"


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        # What Hydra refuses, on one line (and without its `+key=` advice, refused below).
        (["train.stepz=1"], 2, "override 'train.stepz': Key 'stepz' not in 'TrainConfig'"),
        (["model=tinyy"], 2, "Could not find 'model/tinyy' Available options in 'model': hf"),
        (["train.steps=abc"], 2, "train.steps=abc: Value 'abc' of type 'str' could not be"),
        (["+train.foo=1"], 2, "unknown config key(s) train.foo"),
        (["model=hf"], 1, "model.path='' must be a local Hugging Face model directory"),
        # validate_run_config
        (["train.micro_batch=-1"], 2, "train.micro_batch=-1 must be >= 0"),
        (["optim.schedule=linear"], 1, "optim.schedule='linear'; expected one of cosine"),
        ([], 3, "train.global_batch (8) must be divisible by the data-parallel size (3)"),
        # The grid against the model and the sequence length, the model's shapes, the batch.
        (["experiment=demo_cpu"], 32, "ulysses=32 needs query heads (4) divisible by 32"),
        (["parallel=ring", "data.seq_len=100"], 4, "seq_len 100 must be divisible by 2 x ring"),
        (["parallel=ulysses", "parallel.ulysses=3"], 6, "ulysses=3 needs query heads (4)"),
        (["model.dim=30"], 1, "model.dim (30) must be divisible by n_heads (4)"),
        (["parallel=ulysses", "parallel.ulysses=2", "train.global_batch=6"], 8,
         "train.global_batch (6) must be divisible by the data-parallel size (4)"),
        ([], 0, "--world-size 0: need at least one process"),
    ],
)  # fmt: skip
def test_mistakes_raise_one_line(overrides, world_size, message):
    with pytest.raises(ValueError) as err:
        check_config(overrides, world_size)
    text = str(err.value)
    assert message in text
    assert "\n" not in text and "To append" not in text


def _check_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longtrain.check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_prints_one_line_and_exits_0_or_2():
    ok = _check_command("--world-size", "2", "data.source=dir:/my data")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        "config ok: 2 processes = dp=2 x ulysses=1 x ring=1 (parallel=none), model=tiny, "
        "data.seq_len=512, train.global_batch=8, train.steps=100"
    ]
    bad = _check_command("--world-size", "2", "train.stepz=1")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "longtrain.check: error: Could not override 'train.stepz': Key 'stepz' not in "
        "'TrainConfig' (`python -m longtrain.train --cfg job` prints every key)"
    ]
