"""bench/gpu_check's code paths on CPU: the no-GPU exit, the float64 reference against
`attn_naive`, the attention and tiled rows at tiny sizes, the FLOP count, budgets, and the
report (the GPU run itself is `make gpu-check`)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_check.attention import (
    DOC_MEDIAN,
    FWD_BWD_FACTOR,
    attention_flops,
    doc_lengths,
    reference_attention,
    sdpa_masked,
    section_attention,
    varlen_runner,
)
from bench.gpu_check.common import Deadline
from bench.gpu_check.main import main
from bench.gpu_check.pytest_run import parse_junit, pytest_status
from bench.gpu_check.report import render_markdown, run_sections, section_status
from bench.gpu_check.runs import loss_parity_row, memory_row, throughput_row
from bench.gpu_check.tiled import section_tiled
from kernels.attention import attn_naive
from tests.helpers import cu_seqlens

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_prints_one_line_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, also on a machine with one
    cmd = [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 1 and "no CUDA GPU" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale0.3"])
def test_float64_reference_matches_attn_naive_with_gradients(scale):
    lengths, Hq, K, D = [5, 1, 17, 9], 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(sum(lengths), Hq, D, dtype=torch.float64, generator=gen) for _ in "ab")
    k, v = (torch.randn(sum(lengths), K, D, dtype=torch.float64, generator=gen) for _ in "ab")
    cu = cu_seqlens(lengths)
    # 3 rows of the 17-token document per chunk: documents span several chunks.
    ref = reference_attention(q, k, v, dout, cu, scale, chunk_bytes=3 * 8 * Hq * 17)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attn_naive(*leaves, cu, cu, causal=True, softmax_scale=scale)
    expected = dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *torch.autograd.grad(
        out, leaves, dout))))  # fmt: skip
    for name, want in expected.items():
        # Both float64 and exact in method; they differ in summation order only (~1e-15 on
        # these O(1) values). A masking or indexing slip moves values by O(0.1).
        torch.testing.assert_close(ref[name], want.detach(), rtol=0, atol=1e-12, msg=name)


def _perturbed(p):
    out, lse = varlen_runner("torch")(p)
    return out * 1.01, lse


def test_attention_rows_on_cpu_measure_time_and_error():
    backends = {
        "torch": varlen_runner("torch"),
        "sdpa_masked": sdpa_masked,
        "triton": varlen_runner("triton"),
        "perturbed": _perturbed,  # out off by 1%: the error columns must show it
    }
    body = section_attention("cpu", [192], (4, 2, 16), torch.float32, Deadline(600),
                             median=48, goal_tokens=192, backends=backends)  # fmt: skip
    rows = {r["backend"]: r for r in body["rows"]}
    assert rows["torch"]["documents"] > 1 and rows["torch"]["tokens"] == 192
    for name in ("torch", "sdpa_masked"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["fwd_tflops"] > 0 and row["fwd_bwd_tflops"] > 0
        # float32 kernels against float64 over documents of at most 192 tokens: rounding
        # (eps 1.2e-7) through softmax and sums of <= 192 terms stays near 1e-6; 1e-4 still
        # catches a wrong mask or a document boundary crossed (errors of O(0.1)).
        errs = [row[f"err_{n}"] for n in ("out", "dq", "dk", "dv")]
        assert all(0 <= e < 1e-4 for e in errs), row
    assert 0 <= rows["torch"]["err_lse"] < 1e-4
    assert rows["sdpa_masked"]["err_lse"] is None  # SDPA returns no lse
    assert rows["perturbed"]["err_out"] > 1e-3  # 1% of outputs of size ~0.5
    assert rows["triton"]["status"] == "skipped" and rows["triton"]["note"] == "needs CUDA"
    # The goal compares triton with torch_varlen; neither ran here.
    assert body["goals"][0]["status"] == "skipped"
    assert section_status(body) == "ok"


def test_a_spent_budget_skips_every_size_with_the_reason():
    body = section_attention("cpu", [128, 256], (2, 1, 8), torch.float32, Deadline(0),
                             backends={"torch": varlen_runner("torch")})  # fmt: skip
    assert [r["status"] for r in body["rows"]] == ["skipped", "skipped"]
    assert all(r["note"].startswith("budget") for r in body["rows"])
    assert section_status(body) == "skipped"


def test_tiled_loss_and_mlp_rows_on_cpu():
    body = section_tiled("cpu", Deadline(600), (96, 16, 200), (128, 16, 48),
                         torch.float32, loss_tile=32, mlp_budget_mib=0.01)  # fmt: skip
    rows = {(r["kernel"], r["variant"].split(",")[0]): r for r in body["rows"]}
    assert set(rows) == {("loss", "materialised"), ("loss", "tiled torch"),
                         ("mlp", "untiled"), ("mlp", "tiled")}  # fmt: skip
    assert "3 tiles" in rows["mlp", "tiled"]["variant"]  # 128 x 48 x 4 bytes over 0.01 MiB
    assert rows["loss", "tiled torch"]["peak_gib"] is None  # no allocator count on CPU
    # float32, the same sums in another order: the loss (a sum of ~400) to ~1e-4, gradients to
    # ~1e-7. A token lost or counted twice at a tile edge moves the loss by ~5.
    assert 0 < rows["loss", "tiled torch"]["max_diff"] < 1e-3
    assert 0 <= rows["mlp", "tiled"]["max_diff"] < 1e-4


def test_attention_flops_of_a_known_batch():
    # Documents of 1 and 3 tokens: 1 + 6 causal pairs; 4 D FLOPs per pair and head.
    assert attention_flops([1, 3], Hq=2, D=4) == 4 * 4 * 2 * 7
    assert FWD_BWD_FACTOR == 3.5


def test_document_lengths_fill_the_batch_and_are_heavy_tailed():
    for T in (1, 8192, 131072):
        lengths = doc_lengths(T)
        assert sum(lengths) == T and min(lengths) >= 1
    assert doc_lengths(65536) == doc_lengths(65536)  # seeded
    lengths = sorted(doc_lengths(1 << 23))
    median = lengths[len(lengths) // 2]
    # ~500 lognormal draws: the sample median is within 15% of 6,843 at 3 standard errors
    # (1.25 sigma / sqrt(500) in log space, sigma = 1.364).
    assert 0.85 * DOC_MEDIAN < median < 1.15 * DOC_MEDIAN
    assert lengths[-1] > 10 * median  # the heavy tail


def test_markdown_shows_errors_failures_and_skips():
    result = {
        "machine": {"device": "NVIDIA H200"},
        "started": "now",
        "sections": {
            "pytest": {"status": "fail", "seconds": 3.0, "rows": [
                {"passed": 3, "failed": 1, "errors": 0, "skipped": 2, "status": "fail",
                 "failures": ["tests/kernels/test_x.py::test_y[bf16]"]}]},
            "attention": {"status": "ok", "rows": [
                {"tokens": 8192, "backend": "flash_attn", "status": "skipped",
                 "note": "flash_attn does not import: ModuleNotFoundError"},
                {"tokens": 8192, "backend": "triton", "status": "error",
                 "note": "OutOfMemoryError: CUDA out of memory"}],
                "goals": [{"name": "triton / torch_varlen", "target": ">= 0.8", "value": 0.75,
                           "status": "fail"}]},
            "tiled": {"status": "error", "error": "RuntimeError: boom | here"},
            "sp": {"status": "skipped", "note": "overall budget spent"},
        },
    }  # fmt: skip
    md = render_markdown(result)
    assert "| pytest | fail | 3 |" in md
    assert "- failed: `tests/kernels/test_x.py::test_y[bf16]`" in md
    assert "| flash_attn | skipped |" in md and "ModuleNotFoundError" in md
    assert "| triton | error |" in md and "CUDA out of memory" in md
    assert "0.75 **fail**" in md
    assert "error: RuntimeError: boom \\| here" in md  # a '|' would break the table
    assert "| sp | skipped | - | overall budget spent |" in md


def test_a_section_error_is_recorded_and_the_next_section_runs(tmp_path):
    def broken(deadline):
        raise RuntimeError("boom")

    def fine(deadline):
        return {"rows": [{"status": "pass"}, {"status": "skipped"}]}

    result = {"machine": {}, "sections": {}}
    run_sections({"tiled": broken, "train": fine}, {}, 60, result, tmp_path)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert saved["tiled"]["status"] == "error" and saved["tiled"]["error"] == "RuntimeError: boom"
    assert "raise RuntimeError" in saved["tiled"]["traceback"]
    assert saved["train"]["status"] == "pass" and saved["train"]["note"] == "1 skipped, 1 pass"
    assert "boom" in (tmp_path / "gpu_check.md").read_text()
    result = {"machine": {}, "sections": {}}
    run_sections({"train": fine}, {}, 0, result, tmp_path)
    assert result["sections"]["train"]["status"] == "skipped"


def test_section_budgets_keep_the_later_sections_time_and_pass_savings_on(tmp_path):
    given = {}

    def record(name):
        def section(deadline):
            given[name] = deadline.seconds
            return {"rows": []}

        return section

    sections = {name: record(name) for name in ("pytest", "attention", "tiled")}
    budgets = {"pytest": 10, "attention": 30, "tiled": 20}
    frozen = lambda: 0.0  # noqa: E731 - the sections take no time on a clock that stands still
    run_sections(sections, budgets, 100, {"machine": {}, "sections": {}}, tmp_path, frozen)
    # Each gets what is left less what the later ones reserve.
    assert given["pytest"] == pytest.approx(100 - 30 - 20, abs=1)
    assert given["attention"] == pytest.approx(100 - 20, abs=1)
    assert given["tiled"] == pytest.approx(100, abs=1)
    run_sections(sections, budgets, 40, {"machine": {}, "sections": {}}, tmp_path, frozen)
    assert given["pytest"] == 10 and given["attention"] == 30  # their own, less is left over
    assert given["tiled"] == pytest.approx(40, abs=1)  # never more than is left overall


def test_junit_counts_and_failure_names(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.b" name="test_err"><error message="y"/></testcase>'
        '<testcase classname="tests.b" name="test_skip"><skipped message="z"/></testcase>'
        '<testcase classname="" name="tests.c"><error message="collection failure">'
        "ImportError while importing test module\nE   ModuleNotFoundError: No module named 'x'"
        "</error></testcase>"
        "</testsuite></testsuites>"
    )
    got = parse_junit(xml)
    assert got == {
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
        "uncollected": 1,
        "failures": ["tests.a::test_bad", "tests.b::test_err"],
        "uncollected_modules": ["tests.c: ModuleNotFoundError: No module named 'x'"],
    }


def test_pytest_status():
    counts = {"passed": 2, "failed": 0, "errors": 0, "skipped": 1}
    done = {"rc": 0, "timed_out": False, "seconds": 1.0, "tail": ""}
    killed = {"rc": -9, "timed_out": True, "seconds": 90.0, "tail": "collecting"}
    assert pytest_status(counts, done, "gpu") == ("pass", "")
    assert pytest_status(counts, killed, "gpu") == ("error", "pytest timed out after 90 s")
    assert pytest_status({**counts, "failed": 1}, {**done, "rc": 1}, "gpu")[0] == "fail"
    assert pytest_status({**counts, "passed": 0}, done, "gpu")[0] == "skipped"
    assert pytest_status(counts, {**done, "rc": 5}, "gpu")[0] == "skipped"
    # A module that does not import (rc 1) is reported, the tests that ran still count.
    status, note = pytest_status({**counts, "uncollected": 2}, {**done, "rc": 1}, "gpu")
    assert status == "pass" and note.startswith("2 test modules did not import")
    assert pytest_status(counts, {**done, "rc": 2}, "gpu")[0] == "error"  # interrupted


def test_memory_rows_pass_within_5_percent():
    gib = 1 << 30
    assert memory_row(32768, 20 * gib, 20.8 * gib, "")["status"] == "pass"  # 4% over
    assert memory_row(32768, 20 * gib, 21.2 * gib, "")["status"] == "fail"  # 6% over
    assert memory_row(32768, 20 * gib, 18.8 * gib, "")["status"] == "fail"  # 6% under
    row = memory_row(131072, None, 3 * gib, "longtrain.plan exited 2: no fit")
    assert row["status"] == "error" and row["measured_gib"] == 3.0
    assert memory_row(1024, gib, 9 * gib, "", tolerance=None)["status"] == "ok"


def test_throughput_and_loss_parity_rows():
    lines = [{"tokens_per_s": t, "mfu": m, "tflops": 1.0, "loss": 1.0, "mem_peak_bytes": 1 << 30}
             for t, m in [(10, 0.01), (100, 0.4), (120, 0.5), (110, None)]]  # fmt: skip
    row = throughput_row(lines, skip_first=1)
    assert (row["tokens_per_s"], row["mfu"], row["median_over"]) == (110, 0.45, 3)
    expected = [{"loss": 5.0}, {"loss": 4.0}]
    close = loss_parity_row("u", [{"loss": 5.0}, {"loss": 4.0001}], expected, "", 1e-4)
    assert close["status"] == "pass" and close["value"] == pytest.approx(2.5e-5)
    assert loss_parity_row("u", [{"loss": 5.1}, {"loss": 4}], expected, "", 1e-4)["status"] == (
        "fail"
    )
    assert loss_parity_row("u", [], expected, "timed out", 1e-4)["status"] == "error"


@pytest.mark.slow
def test_smoke_run_plans_and_trains_the_tiny_model(tmp_path):
    """The subprocess sections (planner, trainer) end to end on CPU (about a minute here)."""
    rc = main(["--smoke", "--sections", "memory,train", "--out", str(tmp_path)])
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert rc == 0, sections
    (memory,) = sections["memory"]["rows"]
    assert memory["status"] == "ok" and memory["predicted_gib"] > 0 and memory["ratio"] > 0
    (train,) = sections["train"]["rows"]
    assert train["status"] == "ok" and train["steps"] == 4 and train["tokens_per_s"] > 0


HANGING_RUN = """
import sys, time
from pathlib import Path
from bench.gpu_check.report import arm_exits, run_sections
from bench.gpu_check.runs import run_logged

out = Path(sys.argv[1])
result = {"machine": {}, "sections": {}}
arm_exits(result, out, 3.0)
child = ["bash", "-c", f"echo $$ > {out}/child.pid; exec sleep 300"]
hang = lambda deadline: run_logged(child, out / "child.log", 600)
run_sections({"tiled": lambda d: {"rows": []}, "attention": hang}, {}, 600, result, out)
"""


def test_a_hung_section_is_stopped_with_its_subprocess_and_the_results_kept(tmp_path):
    cmd = [sys.executable, "-c", HANGING_RUN, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["tiled"]["status"] == "ok"
    assert sections["attention"]["status"] == "error"
    assert sections["attention"]["error"] == "still running 3 s into the check: stopped"
    pid = int((tmp_path / "child.pid").read_text())
    for _ in range(100):  # SIGKILL was sent before the check exited; let the kernel finish
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not). Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
