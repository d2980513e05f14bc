"""Every Triton kernel compiles for a real GPU (sm_90, bfloat16) on this CPU-only machine,
and the attention kernels' autotune configs fit in shared memory (see gpu_compile.py).

The interpreter tests check the numbers; these check what only the GPU compiler sees.
Slow: one compile takes 1-20 s on 2 shared cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]


def _compile(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.triton.gpu_compile", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no kernel compiled:\n{proc.stderr[-4000:]}"
    return rows


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    rows = _compile()
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']}: {r['error']}" for r in errors)
    assert all(r["fits"] for r in rows), [r for r in rows if not r["fits"]]
    assert len(rows) == 13  # 3 attention kernels x (causal, full) + 7 others


@pytest.mark.slow
def test_attention_autotune_configs_fit():
    """Every autotune config compiles on sm_90 for head dims 128 and 256; at D = 128 every
    config fits the chip's shared memory, at D = 256 at least one does per kernel (the
    autotuner skips the others as out of resources)."""
    rows = _compile("--all-configs")
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']}: {r['error']}" for r in errors)
    for r in rows:
        if "-D128-" in r["kernel"]:
            assert r["fits"], r
    for kernel in ("attn_fwd_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel"):
        big = [r for r in rows if r["kernel"].startswith(f"{kernel}-D256")]
        assert big and any(r["fits"] for r in big), kernel
