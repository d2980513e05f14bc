"""MemoryTracker: live bytes by category, op by op, with views and in-place results not counted
as allocations and workspaces charged while their op runs."""

import torch

from longtrain import torch_private as private
from longtrain.planner.tracker import MemoryTracker

CPU = torch.device("cpu")


def test_counts_allocations_until_freed_and_records_the_peak():
    tracker = MemoryTracker(CPU)
    with tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # 4000 B: 8000 live
        del a
        c = torch.empty(250)  # 1000 B: 5000 live
    assert tracker.total == 5000 and tracker.peak == 8000
    assert tracker.peak_breakdown["activations"] == 8000
    del b, c
    assert tracker.total == 0


def test_views_and_inplace_results_are_not_allocations():
    weight = torch.zeros(100, 100)  # made before: not the step's
    tracker = MemoryTracker(CPU)
    with tracker:
        w_t = weight.t()  # a view of a pre-existing storage
        x = torch.ones(10, 100)
        x.mul_(2)  # in place: same storage
        y = x[2:]  # a view of a tracked storage
    assert tracker.peak == 10 * 100 * 4
    del w_t, y


def test_relabel_moves_bytes_between_categories():
    tracker = MemoryTracker(CPU)
    with tracker:
        g = torch.empty(100)
        tracker.relabel(g, "gradients")
        tracker.relabel(torch.zeros(3).expand(5, 3), "gradients")  # untracked: ignored
    assert tracker.by_category["gradients"] == 400 and tracker.by_category["activations"] == 0


def test_workspace_rules_count_while_the_op_runs():
    rules = {"aten::mm": lambda func, args, kwargs: 10_000}
    tracker = MemoryTracker(CPU, rules)
    with tracker:
        a = torch.ones(10, 10)
        tracker.label = "matmul"
        out = a @ a
    assert tracker.peak == 400 + 10_000  # `a` and the workspace; `out` comes after
    assert tracker.label_peaks["matmul"][0] == tracker.peak
    del out


def test_fake_tensors_are_counted_without_memory():
    with private.fake_mode(), MemoryTracker(CPU) as tracker:
        x = torch.empty(1 << 28)  # 1 GiB that does not exist
        y = x * 2
    assert tracker.peak == 2 << 30
    del x, y


def test_the_flash_family_charges_its_backward_workspace():
    """torch_varlen runs flash-attn's kernels (torch's copy): the same float32 dq accumulator
    [T, H, D] and row statistic [H, T] as flash_attn; triton keeps only the statistic."""
    from longtrain.planner.simulate import workspace_rules

    q = torch.empty(64, 4, 16, device="meta")  # [T, H, D]
    args = (None, None, None, q)  # attn_varlen_bwd(dout, dlse, q, ...): q is the fourth
    rule = "longtrain::attn_varlen_bwd"
    flash = workspace_rules("cuda", "flash_attn")[rule](None, args, {})
    assert flash == 64 * 4 * 16 * 4 + 4 * 64 * 4
    assert workspace_rules("cuda", "torch_varlen")[rule](None, args, {}) == flash
    assert workspace_rules("cuda", "triton")[rule](None, args, {}) == 4 * 64 * 4
    assert rule not in workspace_rules("cpu", "torch_varlen")
