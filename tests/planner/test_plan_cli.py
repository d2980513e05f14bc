"""`python -m longtrain.plan`: the contract of DESIGN.md (plan.json with peak_bytes_per_gpu and
max_seq_len, a printed table) and a clear refusal when nothing fits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _plan(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "longtrain.plan", *overrides, f"hydra.run.dir={tmp_path}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_tiny_recipe_writes_plan_json_and_prints_the_table(tmp_path):
    out = _plan(
        tmp_path, "experiment=tiny_memory_stack", "plan.device=cpu", "plan.gpu_mem_gib=0.05",
        "plan.reserve_gib=0", "plan.seq_len_step=512",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["seq_len"] == 4096 and plan["world_size"] == 2 and plan["engine"] == "zero3"
    assert plan["peak_bytes_per_gpu"] == sum(plan["breakdown_bytes"].values())
    assert plan["fits"] == (plan["peak_bytes_per_gpu"] <= plan["budget_bytes_per_gpu"])
    assert plan["max_seq_len"] % 512 == 0 and plan["max_seq_len"] >= 4096
    assert plan["at_max_seq_len"]["peak_bytes_per_gpu"] <= plan["budget_bytes_per_gpu"]
    for line in ("activations", "communication", "peak", "max_seq_len="):
        assert line in out.stdout


def test_nothing_fits_exits_2_with_the_reason(tmp_path):
    out = _plan(tmp_path, "experiment=tiny_memory_stack", "plan.gpu_mem_gib=0.001",
                "plan.reserve_gib=0")  # fmt: skip
    assert out.returncode == 2
    assert "nothing fits: even seq_len=1024 needs" in out.stderr
    assert "plan.gpu_mem_gib=0.001" in out.stderr and "more GPUs" in out.stderr
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("ulysses", [8, 4])
def test_llama3_8b_1m_recipe_end_to_end(tmp_path, ulysses):
    out = _plan(tmp_path, "experiment=llama3_8b_1m_sp8", f"parallel.ulysses={ulysses}")
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and plan["max_seq_len"] > plan["seq_len"]
