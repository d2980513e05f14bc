"""Bad config values are one clear error before any work (longtrain/config/rules.py,
longtrain/config/schema.py `to_run_config`); each case here used to be accepted silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.config.rules import validate_run_config
from longtrain.errors import ConfigError
from longtrain.train import load_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+train.foo=1"], "unknown config key.*train.foo"),
        (["+foo=1"], "unknown config key.*foo"),
        (["train.micro_batch=-1"], r"train.micro_batch=-1 must be >= 0"),
        (["optim.grad_clip=-1"], r"optim.grad_clip=-1.0 must be >= 0.*0 or null"),
        (["train.ckpt_every=-1"], r"train.ckpt_every=-1 must be >= 0"),
        (["data.curriculum=foo"], r"data.curriculum='foo'; expected one of uniform"),
        (["optim.schedule=foo"], r"optim.schedule='foo'; expected one of cosine, constant"),
        (["optim.lr=-1"], r"optim.lr=-1.0 must be >= 0"),
        (["optim.lr=nan"], r"optim.lr=nan must be >= 0"),
        (
            ["data.stages=[{steps:2,seq_len:-5,rope_theta:10000}]"],
            r"data.stages\[0\].seq_len=-5 must be >= 2",
        ),
        (["train.keep_last=-2"], r"train.keep_last=-2 must be >= 0"),
        (["optim.betas=[0.9,1.5]"], r"optim.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ],
)
def test_bad_values_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_run_config(load_config(overrides), world_size=1)


@pytest.mark.parametrize("off", ["0", "null"])
def test_clipping_turns_off_with_zero_or_null(off):
    cfg = load_config([f"optim.grad_clip={off}"])
    validate_run_config(cfg, world_size=1)
    assert not cfg.optim.grad_clip


def test_the_default_config_is_valid():
    validate_run_config(load_config([]), world_size=1)


def test_the_command_says_a_misspelled_key_in_one_line(tmp_path):
    """Hydra alone would print seven lines and suggest `+train.fooo=1`, which is refused."""
    done = subprocess.run(
        [sys.executable, "-m", "longtrain.train", "train.fooo=1", f"hydra.run.dir={tmp_path}"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "longtrain.train: error: Could not override 'train.fooo': Key 'fooo' not in "
        "'TrainConfig' (`python -m longtrain.train --cfg job` prints every key)"
    ]
