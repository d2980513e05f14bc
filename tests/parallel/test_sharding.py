"""Sharding math (parallel/sharding.py, parallel/layout.py): exact integer expectations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import VarlenMeta
from parallel import ParallelDims, SPLayout, contiguous_split, gather_back, zigzag_split
from parallel.layout import SPMeta, check_config, shard_packed
from tests.parallel.sp_cases import Config


def _cu(lengths):
    return torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()])


def test_zigzag_4_ranks_over_8_tokens():
    # 4 ranks over tokens 0..7: rank r holds chunks r and 2P-1-r.
    assert [zigzag_split(8, 4, r).tolist() for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert zigzag_split(12, 2, 1).tolist() == [3, 4, 5, 6, 7, 8]


def test_contiguous_split():
    assert [contiguous_split(8, 4, r).tolist() for r in range(4)] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]


def test_split_errors_name_the_fix():
    with pytest.raises(ValueError, match="10 tokens over 4 ranks needs a multiple of 8; pad to 16"):
        zigzag_split(10, 4, 0)
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        contiguous_split(8, 4, 4)


def test_gather_back_inverts_and_detects_overlap():
    idx = [zigzag_split(8, 2, r) for r in range(2)]
    x = torch.arange(8) * 10
    assert gather_back([x[i] for i in idx], idx, 8).tolist() == x.tolist()
    with pytest.raises(ValueError, match="held"):
        gather_back([x[:4], x[:4]], [torch.arange(4), torch.arange(4)], 8)


def test_per_document_zigzag_exact():
    # Documents of 5, 1 and 13 tokens over a ring of 2: each padded to a multiple of 4
    # (8, 4, 16); chunks of 2, 1 and 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    layout = SPLayout(_cu([5, 1, 13]), 19, ring=2, ulysses=1)
    assert layout.ring_index(0).tolist() == [0, 1, -1, -1, 5, -1, 6, 7, 8, 9, 18, -1, -1, -1]
    assert layout.ring_index(1).tolist() == [2, 3, 4, -1, -1, -1, 10, 11, 12, 13, 14, 15, 16, 17]
    assert layout.position_ids(0, 0).tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 12, 0, 0, 0]
    # Per document: real tokens, then padding as a document of its own.
    assert layout.ring_cu_seqlens(0).tolist() == [0, 2, 4, 5, 6, 11, 14]
    assert layout.ring_cu_seqlens(1).tolist() == [0, 3, 4, 6, 14]
    assert layout.num_padding == 9


def test_ulysses_contiguous_with_trailing_padding():
    layout = SPLayout(_cu([5, 1, 13]), 19, ring=1, ulysses=4)
    got = [layout.local_index(0, u).tolist() for u in range(4)]
    assert got == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, -1]]
    assert layout.ring_cu_seqlens(0).tolist() == [0, 5, 6, 19, 20]


def test_usp_adds_a_padding_document_so_ulysses_divides():
    # Ring of 2 gives 14 tokens per ring rank; Ulysses 3 needs a multiple of 3: a trailing
    # padding document of 2 x 2 x 2 = 8 tokens adds 4 per ring rank (18 = 3 x 6).
    layout = SPLayout(_cu([5, 1, 13]), 19, ring=2, ulysses=3)
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
    layout = SPLayout(_cu(lengths), total, ring, ulysses)
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
    layout = shard_packed(_cu([5, 1, 13]), 19, dims, cfg, sp_rank=0)
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
    layout = shard_packed(_cu([5, 1, 13]), 19, ParallelDims(1), Config("none"))
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
        shard_packed(_cu([5, 1, 13]), 20, ParallelDims(2, ring=2), Config("ring"), sp_rank=0)
