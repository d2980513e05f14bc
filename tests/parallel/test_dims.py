"""ParallelDims (parallel/dims.py): every rule fails early with the numbers, and the mesh
puts each Ulysses group on consecutive ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel import ParallelDims, valid_ulysses_degrees
from parallel.dims import check_qkv, kv_heads_per_rank
from tests.spawn import spawn


def test_dp_defaults_to_the_rest():
    dims = ParallelDims(8, ulysses=2, ring=2)
    assert (dims.dp, dims.sp_size) == (2, 4)
    assert ParallelDims(4).dp == 4


def test_world_size_must_match():
    with pytest.raises(
        ValueError, match=r"world size 6 is not divisible by ulysses x ring = 2 x 2 = 4"
    ):
        ParallelDims(6, ulysses=2, ring=2)
    with pytest.raises(ValueError, match=r"world size 8 != dp x ulysses x ring = 1 x 2 x 2 = 4"):
        ParallelDims(8, ulysses=2, ring=2, dp=1)
    with pytest.raises(ValueError, match="ulysses must be a positive integer, got 0"):
        ParallelDims(4, ulysses=0)


def test_heads_rules_list_the_valid_degrees():
    with pytest.raises(
        ValueError,
        match=r"ulysses=4 needs query heads \(6\) divisible by 4; valid degrees: 1, 2, 3, 6",
    ):
        ParallelDims(4, ulysses=4).validate(6, 6)
    # 8 query heads, 6 KV heads is no GQA layout at all.
    with pytest.raises(ValueError, match=r"query heads \(8\) must be a multiple of KV heads \(6\)"):
        ParallelDims(1).validate(8, 6)
    # 12 query heads / 3 KV heads under ulysses=2: 3 KV heads neither split nor replicate.
    with pytest.raises(
        ValueError, match=r"ulysses=2 needs KV heads \(3\) divisible by 2, or 2 divisible by KV"
    ):
        ParallelDims(2, ulysses=2).validate(12, 3)
    assert valid_ulysses_degrees(12, 3) == [1, 3, 6, 12]
    ParallelDims(4, ulysses=4).validate(8, 2)  # KV heads replicated twice: allowed
    ParallelDims(8, ring=8).validate(6, 1)  # ring alone has no head rule


def test_kv_heads_per_rank_and_qkv_shapes():
    # 8 KV heads over 4 Ulysses ranks split (2 each); 2 KV heads over 4 are replicated (1 each).
    assert kv_heads_per_rank(8, 4) == 2 and kv_heads_per_rank(2, 4) == 1
    q, k = torch.zeros(4, 2, 8), torch.zeros(3, 1, 8)
    with pytest.raises(
        ValueError,
        match=r"ring attention needs q \[T, Hq, D\] and k, v \[T, K, D\] with the same T, got "
        r"\(4, 2, 8\), \(3, 1, 8\), \(3, 1, 8\)",
    ):
        check_qkv("ring attention", q, k, k)


def test_sequence_length_rules():
    with pytest.raises(
        ValueError,
        match=r"seq_len 1000 must be divisible by 2 x ring x ulysses = 2 x 4 x 2 = 16 .*"
        r"nearest valid: 992 or 1008",
    ):
        ParallelDims(8, ulysses=2, ring=4).validate(8, 8, seq_len=1000)
    with pytest.raises(ValueError, match=r"seq_len 10 must be divisible by ulysses \(4\)"):
        ParallelDims(4, ulysses=4).validate(8, 8, seq_len=10)
    ParallelDims(4, ulysses=2, ring=2).validate(8, 8, seq_len=4096)


def test_groups_need_the_mesh():
    with pytest.raises(RuntimeError, match="build_mesh"):
        _ = ParallelDims(2, ring=2).ring_group


def _mesh_worker(rank: int, world_size: int) -> dict:
    out = {}
    # Two meshes (group creation costs seconds under gloo): 2-D SP, and Ulysses with dp.
    for name, (u, r) in {"u2r2": (2, 2), "u2dp2": (2, 1)}.items():
        dims = ParallelDims(world_size, ulysses=u, ring=r)
        dims.build_mesh("cpu")
        out[name] = {
            "ulysses": dist.get_process_group_ranks(dims.ulysses_group),
            "ring": dist.get_process_group_ranks(dims.ring_group),
            "dp": dist.get_process_group_ranks(dims.dp_group),
            "sp": dist.get_process_group_ranks(dims.sp_group),
            "dp_sp": dist.get_process_group_ranks(dims.dp_sp_group),
            "coords": (dims.dp_rank, dims.ring_rank, dims.ulysses_rank, dims.sp_rank),
        }
    return out


@pytest.mark.distributed
def test_mesh_keeps_ulysses_on_consecutive_ranks():
    res = spawn(_mesh_worker, 4)
    # rank = dp * (ring * ulysses) + ring_idx * ulysses + ulysses_idx
    want = {
        "u2r2": {"ulysses": [[0, 1], [0, 1], [2, 3], [2, 3]], "ring": [[0, 2], [1, 3]] * 2},
        "u2dp2": {"ulysses": [[0, 1], [0, 1], [2, 3], [2, 3]], "dp": [[0, 2], [1, 3]] * 2},
    }
    for name, groups in want.items():
        for axis, per_rank in groups.items():
            assert [res[r][name][axis] for r in range(4)] == per_rank, (name, axis)
    assert [res[r]["u2r2"]["sp"] for r in range(4)] == [[0, 1, 2, 3]] * 4
    assert [res[r]["u2dp2"]["sp"] for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(res[r][n]["dp_sp"] == [0, 1, 2, 3] for r in range(4) for n in want)
    assert [res[r]["u2r2"]["coords"] for r in range(4)] == [
        (0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 0, 2), (0, 1, 1, 3)
    ]  # fmt: skip
