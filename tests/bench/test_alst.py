"""Smoke test of bench/alst.py: a tiny Llama under Ulysses 2, ours against DeepSpeed's ALST.

Asserts behaviour, never time: both candidates ran, the table's JSON was written, and the two
computed the same thing. Tolerances: both run transformers' own embedding, norms, RoPE, MLP
and projections on the same float32 weights and tokens, and the same CPU flash-attention op;
what differs is the layout of the attention inputs (strided views vs contiguous copies), the
logits matmul call, and the loss (our tiled sum over tokens vs transformers' per-rank mean,
weighted across ranks). Those reorder float32 sums of at most a few hundred terms: relative
errors of ~1e-6 at most (unit roundoff 6e-8 times the terms of a sum), so 1e-4 relative to
the largest value leaves two orders of margin yet catches any real mismatch (a wrong shard,
a missing token, a gradient off by the factor P: all are O(1) relative).
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 1e-4  # see the module docstring: float32 reassociation, two orders of margin


def test_alst_quick_runs_both_and_they_agree(tmp_path):
    from bench.alst import main

    out = tmp_path / "alst.json"
    (row,) = main(["--quick", "--world-sizes", "2", "--out", str(out)])

    assert row["P"] == 2
    for key in ("ours_s", "alst_s", "ratio_ours_over_alst"):  # both ran and were timed
        assert math.isfinite(row[key]) and row[key] > 0, key
    assert json.loads(out.read_text())["rows"] == [row]

    assert row["loss_ours"] == pytest.approx(row["loss_alst"], rel=RTOL)
    # Small random weights give nearly uniform predictions: the loss is about ln(V = 512).
    assert row["loss_ours"] == pytest.approx(math.log(512), rel=0.05)
    assert row["grad_max_abs"] > 0
    assert row["grad_max_abs_diff"] <= RTOL * row["grad_max_abs"]
    assert row["logits_max_abs_diff"] <= RTOL * row["logits_max_abs"]
