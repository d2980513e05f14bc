"""`python -m longtrain.data.prepare` and `python -m longtrain.data.stats` report a user's
mistake as one line on stderr and exit status 2, not as a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import write_text_corpus

ROOT = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LONGTRAIN_FULL_ERROR", None)
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["missing source", "user directory", "source as output"])
def test_prepare_errors_are_one_line(tmp_path, case):
    corpus = write_text_corpus(tmp_path / "docs", num_docs=3)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    source, out, named = {
        "missing source": (f"dir:{tmp_path / 'nope'}", tmp_path / "s", "nope"),
        "user directory": (f"dir:{corpus}", tmp_path / "model", "model"),
        "source as output": (f"dir:{corpus}", corpus, "overlaps the source"),
    }[case]
    proc = _run("longtrain.data.prepare", "--source", source, "--out", str(out), "--no-progress")
    assert named in _one_error_line(proc, "longtrain.data.prepare")
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
    assert len(list(corpus.iterdir())) == 3


def test_stats_error_is_one_line(tmp_path):
    proc = _run("longtrain.data.stats", "--store", str(tmp_path / "nowhere"), "--seq-len", "256")
    assert "nowhere" in _one_error_line(proc, "longtrain.data.stats")
