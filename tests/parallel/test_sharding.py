"""Sharding math (parallel/sharding.py, parallel/layout.py): exact integer expectations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import VarlenMeta
from parallel import ParallelDims, SPLayout
from parallel.layout import SPMeta, check_config, shard_packed
from tests.helpers import cu_seqlens
from tests.parallel.sp_cases import Config


def test_zigzag_4_ranks_over_8_tokens():
    # 4 ring ranks over tokens 0..7 (one document): rank r holds chunks r and 2R-1-r.
    layout = SPLayout(cu_seqlens([8]), 8, ring=4, ulysses=1)
    assert [layout.ring_index(r).tolist() for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [layout.position_ids(r, 0).tolist() for r in range(4)] == [
        [0, 7], [1, 6], [2, 5], [3, 4]
    ]  # fmt: skip
    # 2 ring ranks over tokens 0..11: chunks of 3, rank 1 holds chunks 1 and 2.
    assert SPLayout(cu_seqlens([12]), 12, ring=2, ulysses=1).ring_index(1).tolist() == [
        3, 4, 5, 6, 7, 8
    ]  # fmt: skip


def test_shard_packed_layouts_the_trainer_uses():
    # What each SP rank holds of tokens 0..7 (one document), as parallel.shard_packed gives it.
    def held(cfg, world_size):
        dims = ParallelDims(world_size, ulysses=cfg.ulysses, ring=cfg.ring)
        return [
            shard_packed(cu_seqlens([8]), 8, dims, cfg, sp_rank=r).local_index_T.tolist()
            for r in range(world_size)
        ]

    # Ulysses: contiguous slices.
    assert held(Config("ulysses", ulysses=4), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Ring: per-document zigzag.
    assert held(Config("ring", ring=4), 4) == [[0, 7], [1, 6], [2, 5], [3, 4]]
    # USP 2 x 2: zigzag over the ring (rank 0 [0, 1, 6, 7], rank 1 [2, 3, 4, 5]), then
    # contiguous inside each Ulysses pair; sp_rank = ring_rank * ulysses + ulysses_rank.
    assert held(Config("usp", ulysses=2, ring=2), 4) == [[0, 1], [6, 7], [2, 3], [4, 5]]


def test_split_errors_name_the_fix():
    layout = SPLayout(cu_seqlens([8]), 8, ring=4, ulysses=2)
    with pytest.raises(ValueError, match="ring rank 4 is outside 0..3"):
        layout.ring_index(4)
    with pytest.raises(ValueError, match="ulysses rank 2 is outside 0..1"):
        layout.local_index(0, 2)
    with pytest.raises(ValueError, match=r"ring \(0\) and ulysses \(1\) must be >= 1"):
        SPLayout(cu_seqlens([8]), 8, ring=0, ulysses=1)
    with pytest.raises(ValueError, match="sp_rank 4 is outside 0..3"):
        shard_packed(cu_seqlens([8]), 8, ParallelDims(4, ring=4), Config("ring"), sp_rank=4)


def test_padded_to_ring_inverts_ring_index():
    # One document of 5 over a ring of 2 is padded to 8 (chunks of 2): rank 0 holds padded
    # positions 0, 1, 6, 7 and rank 1 holds 2, 3, 4, 5; positions 5..7 are padding.
    layout = SPLayout(cu_seqlens([5]), 5, ring=2, ulysses=1)
    assert layout.padded_to_ring().tolist() == [0, 1, 4, 5, 6, 7, 2, 3]
    flat = torch.cat([layout.ring_index(r) for r in range(2)])
    assert flat[layout.padded_to_ring()].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]


def test_per_document_zigzag_exact():
    # Documents of 5, 1 and 13 tokens over a ring of 2: each padded to a multiple of 4
    # (8, 4, 16); chunks of 2, 1 and 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    layout = SPLayout(cu_seqlens([5, 1, 13]), 19, ring=2, ulysses=1)
    assert layout.ring_index(0).tolist() == [0, 1, -1, -1, 5, -1, 6, 7, 8, 9, 18, -1, -1, -1]
    assert layout.ring_index(1).tolist() == [2, 3, 4, -1, -1, -1, 10, 11, 12, 13, 14, 15, 16, 17]
    assert layout.position_ids(0, 0).tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 12, 0, 0, 0]
    # Per document: real tokens, then padding as a document of its own.
    assert layout.ring_cu_seqlens(0).tolist() == [0, 2, 4, 5, 6, 11, 14]
    assert layout.ring_cu_seqlens(1).tolist() == [0, 3, 4, 6, 14]
    assert layout.num_padding == 9


def test_ulysses_contiguous_with_trailing_padding():
    layout = SPLayout(cu_seqlens([5, 1, 13]), 19, ring=1, ulysses=4)
    got = [layout.local_index(0, u).tolist() for u in range(4)]
    assert got == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, -1]]
    assert layout.ring_cu_seqlens(0).tolist() == [0, 5, 6, 19, 20]


def test_usp_adds_a_padding_document_so_ulysses_divides():
    # Ring of 2 gives 14 tokens per ring rank; Ulysses 3 needs a multiple of 3: a trailing
    # padding document of 2 x 2 x 2 = 8 tokens adds 4 per ring rank (18 = 3 x 6).
    layout = SPLayout(cu_seqlens([5, 1, 13]), 19, ring=2, ulysses=3)
    assert layout.ring_tokens == 18 and layout.local_tokens == 6
    assert layout.local_index(0, 1).tolist() == [6, 7, 8, 9, 18, -1]
    assert layout.local_index(0, 2).tolist() == [-1] * 6


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    ring=st.integers(1, 4),
    ulysses=st.integers(1, 3),
)
def test_every_token_once_and_zigzag_balances(lengths, ring, ulysses):
    total = sum(lengths)
    layout = SPLayout(cu_seqlens(lengths), total, ring, ulysses)
    idx = [layout.local_index(r, u) for r in range(ring) for u in range(ulysses)]
    assert all(len(i) == layout.local_tokens for i in idx)
    held = torch.cat(idx)
    assert sorted(held[held >= 0].tolist()) == list(range(total))
    assert int((held < 0).sum()) == layout.num_padding
    # Padding per document < 2R (ring) and the trailing document < 2R x ulysses tokens.
    assert layout.num_padding < 2 * ring * (len(lengths) + ulysses)
    # Position ids restart per document and match the original positions.
    pos = torch.cat([torch.arange(n) for n in lengths]) if total else torch.zeros(0)
    for r in range(ring):
        for u in range(ulysses):
            i = layout.local_index(r, u)
            want = torch.where(i >= 0, pos[i.clamp(min=0)] if total else i, 0)
            assert layout.position_ids(r, u).tolist() == want.tolist()
    if ring > 1:
        # Causal work of the padded documents, sum of (position + 1), is equal on every ring
        # rank: chunks r and 2R-1-r cost the same in total, for every document.
        work = [int((layout.doc_pos(r)[1] + 1).sum()) for r in range(ring)]
        assert len(set(work)) == 1, work


def test_take_fills_padding():
    dims = ParallelDims(2, ring=2)
    cfg = Config("ring", ring=2)
    layout = shard_packed(cu_seqlens([5, 1, 13]), 19, dims, cfg, sp_rank=0)
    assert layout.num_padding == 6
    tokens = torch.arange(19) + 100
    assert layout.take(tokens, 0).tolist() == [
        100,
        101,
        0,
        0,
        105,
        0,
        106,
        107,
        108,
        109,
        118,
        0,
        0,
        0,
    ]
    labels = layout.take(tokens, -100)
    assert int((labels == -100).sum()) == 6
    weights = layout.take(torch.ones(19, dtype=torch.float64), 0.0)
    assert float(weights.sum()) == 8.0
    assert isinstance(layout.attn_meta, SPMeta)


def test_shard_packed_without_sp_is_the_whole_batch():
    layout = shard_packed(cu_seqlens([5, 1, 13]), 19, ParallelDims(1), Config("none"))
    assert layout.local_index_T.tolist() == list(range(19)) and layout.num_padding == 0
    assert isinstance(layout.attn_meta, VarlenMeta)
    assert layout.attn_meta.max_seqlen_q == 13


def test_config_errors():
    with pytest.raises(ValueError, match="parallel=ulysses with ring=2; use parallel=usp"):
        check_config(ParallelDims(4, ulysses=2, ring=2), Config("ulysses", 2, 2))
    with pytest.raises(ValueError, match="parallel=none but ulysses=2"):
        check_config(ParallelDims(2, ulysses=2), Config("none"))
    with pytest.raises(ValueError, match="ring_impl='p2p'; expected one of zigzag, allgather"):
        check_config(ParallelDims(2, ring=2), Config("ring", ring=2, ring_impl="p2p"))
    with pytest.raises(ValueError, match="cu_seqlens ends at 19 but the micro-batch has 20"):
        shard_packed(cu_seqlens([5, 1, 13]), 20, ParallelDims(2, ring=2), Config("ring"), sp_rank=0)
