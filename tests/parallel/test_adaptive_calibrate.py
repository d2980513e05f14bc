"""Start-up calibration of the adaptive placement's cost model (parallel/adaptive_calibrate.py)
on 2 gloo processes: measured values, the same on every rank; a calibration that runs past its
time or fails on one rank leaves every rank with the configured model, in one line."""

from __future__ import annotations

import math

import pytest
import torch

from parallel import AttnShape, ParallelDims, SPCostModel
from tests.spawn import spawn

pytestmark = pytest.mark.distributed

SHAPE = AttnShape(4, 2, 8, torch.float32)
FALLBACK = SPCostModel.analytic(4, 2, 8, 32, 64, tflops=400, link_gbps=100, latency_us=20)


def _worker(rank: int, world_size: int) -> dict:
    from parallel import adaptive_calibrate as cal

    dims = ParallelDims(world_size, ring=world_size)
    dims.build_mesh("cpu")
    cpu = torch.device("cpu")
    out = {"ok": cal.calibrate(dims.sp_group, cpu, SHAPE, 32, 64, FALLBACK, 60.0, "torch")}
    out["late"] = cal.calibrate(dims.sp_group, cpu, SHAPE, 32, 64, FALLBACK, 1e-9, "torch")
    if rank == 1:  # one rank's probe fails: both must fall back, neither may hang

        def broken(*args):
            raise RuntimeError("probe failed")

        cal._local_measurements = broken
    out["broken"] = cal.calibrate(dims.sp_group, cpu, SHAPE, 32, 64, FALLBACK, 60.0, "torch")
    return out


def test_calibration_agrees_across_ranks_and_falls_back_in_one_line():
    per_rank = spawn(_worker, 2, timeout=300)
    (model0, line0), (model1, _) = per_rank[0]["ok"], per_rank[1]["ok"]
    assert model0 == model1  # every rank the slowest rank's numbers
    for value in (model0.pair_s, model0.token_s, model0.bytes_per_s):
        assert math.isfinite(value) and value > 0
    assert model0 != FALLBACK and line0.startswith("sp cost model: calibrated in ")
    for case, why in (("late", "timed out after"), ("broken", "")):
        for rank, results in enumerate(per_rank):
            model, line = results[case]
            assert model == FALLBACK, (case, rank)
            assert "using the configured values" in line and why in line, line
            assert "\n" not in line
    assert "RuntimeError: probe failed" in per_rank[1]["broken"][1]
    assert "on another rank" in per_rank[0]["broken"][1]
