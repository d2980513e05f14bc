"""Start-up calibration of the adaptive placement's cost model (parallel/adaptive_calibrate.py)
on 2 gloo processes: measured values, the same on every rank; a calibration that runs past its
time or fails on one rank leaves every rank with the configured model, in one line."""

from __future__ import annotations

import math

import pytest
import torch

from parallel import AttnShape, ParallelDims, SPCostModel, SplitMethod
from tests.spawn import spawn

pytestmark = pytest.mark.distributed

SHAPE = AttnShape(4, 2, 8, torch.float32)
FALLBACK = SPCostModel.analytic(4, 2, 8, 32, 64, tflops=400, link_gbps=100, latency_us=20)


def _worker(rank: int, world_size: int) -> dict:
    from parallel import adaptive_calibrate as cal

    dims = ParallelDims(world_size, ring=world_size)
    dims.build_mesh("cpu")
    dims.alternate = ParallelDims(world_size, ulysses=world_size)
    dims.alternate.build_mesh("cpu")
    cpu = torch.device("cpu")
    out = {"ok": cal.calibrate(dims.sp_group, cpu, SHAPE, 32, 64, FALLBACK, 60.0, "torch")}
    methods = [SplitMethod("ring", 2, 1, "zigzag"), SplitMethod("ulysses", 1, 2),
               SplitMethod("ring_allgather", 2, 1, "allgather"),
               SplitMethod("usp", 2, 2)]  # fmt: skip
    probes = cal.method_probes(methods, dims)
    out["probed"] = [p.method for p in probes]
    out["methods"] = cal.calibrate(dims.sp_group, cpu, SHAPE, 32, 64, FALLBACK, 60.0, "torch",
                                   probes, dims.sp_rank)  # fmt: skip
    out["late"] = cal.calibrate(dims.sp_group, cpu, SHAPE, 32, 64, FALLBACK, 1e-9, "torch",
                                probes, dims.sp_rank)  # fmt: skip

    def broken(*args):
        raise RuntimeError("probe failed")

    if rank == 1:  # one rank's split-method probe fails: both fall back, neither may hang
        cal._split_step = broken
    out["broken_split"] = cal.calibrate(dims.sp_group, cpu, SHAPE, 32, 64, FALLBACK, 60.0,
                                        "torch", probes, dims.sp_rank)  # fmt: skip
    if rank == 1:  # one rank's local probe fails
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
    assert model0.split_overheads == ()  # no probes: every method's overhead stays 0
    # Each method with a grid is measured over its own groups (usp 2 x 2 has none here).
    assert per_rank[0]["probed"] == [SplitMethod("ring", 2, 1, "zigzag"),
                                     SplitMethod("ulysses", 1, 2),
                                     SplitMethod("ring_allgather", 2, 1, "allgather")]  # fmt: skip
    (with_methods, line), (other_rank, _) = per_rank[0]["methods"], per_rank[1]["methods"]
    assert with_methods == other_rank
    overheads = dict(with_methods.split_overheads)
    assert list(overheads) == ["ring2:zigzag", "ulysses2", "ring2:allgather"]
    # Seconds per token beyond the formulas: measured, never negative (their sizes are
    # timings: bench/adaptive_sp.py prints them with the calibration line).
    assert all(math.isfinite(s) and s >= 0 for s in overheads.values()), overheads
    assert math.isfinite(with_methods.pair_s) and with_methods.pair_s > 0
    assert "split methods cost per token beyond that (1024-token probe): ring2:zigzag " in line
    assert "\n" not in line
    for case, why in (("late", "timed out after"), ("broken", ""), ("broken_split", "")):
        for rank, results in enumerate(per_rank):
            model, line = results[case]
            assert model == FALLBACK, (case, rank)
            assert "using the configured values" in line and why in line, line
            assert "\n" not in line
    for case in ("broken", "broken_split"):
        assert "RuntimeError: probe failed" in per_rank[1][case][1]
        assert "on another rank" in per_rank[0][case][1]
