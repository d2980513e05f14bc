"""The planner against real CPU runs: peak memory of a training step as the CPU allocator
reports it to `torch.profiler` (see bench/memory.py for the method), beside the prediction."""

import pytest

from bench.memory import CASES, _measure, predict, run_case

SEQ_LEN = 1024
BY_NAME = {case[0]: case for case in CASES}


@pytest.mark.parametrize("name", ["plain", "stack: tiles + full AC + offload"])
def test_one_process_prediction_matches_the_allocator(name):
    case = BY_NAME[name]
    measured = _measure(0, 1, case, SEQ_LEN)
    predicted = predict(case, SEQ_LEN).peak_bytes
    # One process holds exactly the tensors the simulation makes (fake kernels allocate what
    # the real ones return); only a few KiB allocated inside CPU kernels are unseen
    # (seen: 0.015 % at most). The bar is 15 %.
    assert predicted == pytest.approx(measured, rel=0.005)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ulysses 2, stack, fsdp2", "dp 2, stack, fsdp2"])
def test_two_process_prediction_is_within_15_percent(name):
    row = run_case(BY_NAME[name], SEQ_LEN)
    # FSDP2's gather/reduce buffers are modelled per block (engine_state), and their real
    # lifetimes follow asynchronous collectives: seen within 5 %; the bar is 15 %.
    assert abs(row["error"]) <= 0.15, row
