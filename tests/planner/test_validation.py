"""The planner against real CPU runs built as the trainer builds them (`parallelize`): peak
memory of a training step as the CPU allocator reports it to `torch.profiler` (see
bench/memory.py for the method), beside the prediction, in float32 and in bf16."""

import pytest

from bench.memory import CASES, _measure, measure_forward_activations, predict, run_case

SEQ_LEN = 1024
BY_NAME = {case[0]: case for case in CASES}


@pytest.mark.parametrize(
    "name",
    [
        "plain",
        "stack: tiles + full AC + offload",
        "stack, offload 2 of 4 blocks",
        "stack: tiles + full AC + offload, bf16",
    ],
)
def test_one_process_prediction_matches_the_allocator(name):
    case = BY_NAME[name]
    measured, _ = _measure(0, 1, case, SEQ_LEN)
    predicted = predict(case, SEQ_LEN).peak_bytes
    # One process holds exactly the tensors the simulation makes (fake kernels allocate what
    # the real ones return); only a few KiB allocated inside CPU kernels are unseen
    # (seen: 0.015 % at most, float32 and bf16). The bar is 3 %.
    assert predicted == pytest.approx(measured, rel=0.005)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["ulysses 2, stack, fsdp2, bf16", "dp 2, stack, fsdp2, bf16"])
def test_two_process_bf16_prediction_is_within_3_percent(name):
    # The least of three measurements: when a gloo worker thread drops the last reference to
    # a collective's buffer (FSDP2's previous reduce-scatter input), the profiler does not
    # see the free until the address is reused, so a run can read one block's float32
    # gradients high (+2.8 MB, 7 %; seen in up to half the runs on a loaded machine).
    row = run_case(BY_NAME[name], SEQ_LEN, repeats=3)
    # FSDP2's buffers are allocated at the times FSDP2 holds them (`_fsdp2_schedule`) and
    # the unsharded gradients are tracked as autograd makes them. Seen: within 0.1 % of the
    # least measurement. The bar is 3 %.
    assert abs(row["error"]) <= 0.03, row


def test_bf16_forward_activations_are_at_most_0_55_of_float32():
    bf16 = measure_forward_activations(BY_NAME["plain, bf16"], SEQ_LEN)
    fp32 = measure_forward_activations(BY_NAME["plain"], SEQ_LEN)
    # bf16 halves every activation the blocks save; the float32 statistics that stay (softmax
    # log-sum-exp, norm statistics, loss tiles) are a few percent of them. Measured 0.535;
    # 0.60 when linear layers kept autocast's bf16 weight copies for the backward, 0.66
    # when the torch RMSNorm also kept float32 [T, E] copies.
    assert bf16 <= 0.55 * fp32, (bf16, fp32, bf16 / fp32)
