"""`python -m longtrain.plan`: the contract of DESIGN.md (plan.json with peak_bytes_per_gpu,
max_seq_len, host_bytes_per_gpu and at_max_seq_len, a printed table), the overrides that run
the answer, and clear one-line refusals."""

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
    assert plan["model_dtype"] == "bfloat16" and plan["offloaded_blocks"] == 2
    assert plan["peak_bytes_per_gpu"] == sum(plan["breakdown_bytes"].values())
    assert plan["host_bytes_per_gpu"] == sum(plan["host_breakdown_bytes"].values())
    assert plan["fits"] == (
        plan["peak_bytes_per_gpu"] <= plan["budget_bytes_per_gpu"]
        and plan["host_bytes_per_gpu"] <= plan["host_budget_bytes_per_gpu"]
    )
    at_max = plan["at_max_seq_len"]
    assert plan["max_seq_len"] % 512 == 0 and plan["max_seq_len"] >= 4096
    assert at_max["seq_len"] == plan["max_seq_len"]
    assert at_max["peak_bytes_per_gpu"] <= plan["budget_bytes_per_gpu"]
    assert at_max["host_bytes_per_gpu"] <= plan["host_budget_bytes_per_gpu"]
    assert plan["run_overrides"] == (
        f"data.seq_len={plan['max_seq_len']} "
        f"train.memory.offload_activations={at_max['offloaded_blocks']}"
    )
    assert plan["kernels"] == {"attention": "torch", "rope_norm": "torch", "loss": "torch"}
    for line in ("activations", "communication", "peak", "host", "max_seq_len=", "run it with:",
                 "assumes: attention torch"):  # fmt: skip
        assert line in out.stdout


def test_nothing_fits_exits_2_with_the_reason(tmp_path):
    out = _plan(tmp_path, "experiment=tiny_memory_stack", "plan.gpu_mem_gib=0.001",
                "plan.reserve_gib=0")  # fmt: skip
    assert out.returncode == 2
    assert "nothing fits: even seq_len=1024 needs" in out.stderr
    assert "plan.gpu_mem_gib=0.001" in out.stderr and "more GPUs" in out.stderr
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("plan.host_mem_gib=0", "plan.host_mem_gib=0 must be > 0"),
        ("plan.world_size=12", "plan.gpus_per_node=8 does not divide the world size 12"),
        ("train.memory.offload_activations=5", "offload_activations=5 is above the model's 4"),
    ],
)
def test_bad_plan_input_exits_2_in_one_line(tmp_path, override, message):
    out = _plan(tmp_path, "experiment=tiny_memory_stack", override)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_llama3_8b_1m_recipe_end_to_end(tmp_path):
    # Capped at 2M so that the search ends at plan.max_seq_len in a few simulations (the
    # uncapped search takes minutes; its numbers are in the README).
    out = _plan(tmp_path, "experiment=llama3_8b_1m_sp8", "train.memory.offload_activations=true",
                "plan.max_seq_len=2097152")  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and plan["max_seq_len"] == 2097152
    assert plan["max_seq_len_limited_by"] == "plan.max_seq_len"
    assert plan["kernels"] == {"attention": "flash_attn", "rope_norm": "triton", "loss": "torch"}
    assert plan["host_budget_bytes_per_gpu"] == int(1.9e12) // 8
