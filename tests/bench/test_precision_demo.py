"""bench/precision_demo.py's comparison of two loss curves (the training runs themselves are
the benchmark's, not the test suite's)."""

import json

import pytest

from bench.precision_demo import compare, losses


def test_compare_takes_the_common_steps_and_signed_differences():
    fp32 = {0: 5.0, 1: 4.0, 2: 3.0}
    bf16 = {0: 5.5, 1: 3.75, 2: 3.0, 3: 9.0}  # step 3 has no float32 partner: ignored
    result = compare(fp32, bf16)
    assert result["steps"] == 3
    assert result["max_abs_diff"] == 0.5
    assert result["mean_abs_diff"] == pytest.approx(0.25)
    assert result["mean_diff"] == pytest.approx(0.25 / 3)
    assert result["ratio_bf16_over_fp32"] == pytest.approx((5.5 + 3.75 + 3.0) / 12.0)
    with pytest.raises(ValueError, match="share no step"):
        compare({0: 1.0}, {1: 1.0})


def test_losses_skip_evaluation_lines(tmp_path):
    lines = [{"step": 0, "loss": 2.0}, {"step": 0, "eval_loss": 9.0}, {"step": 1, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert losses(tmp_path) == {0: 2.0, 1: 1.5}
