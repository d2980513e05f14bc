"""Sequence parallelism: the process grid, sharding math, Ulysses, Ring and USP attention.

    dims = ParallelDims(world_size, ulysses=2, ring=2)   # dp = the rest
    dims.validate(num_heads, num_kv_heads, seq_len)       # fails early, naming the numbers
    dims.build_mesh("cuda")                               # ("dp", "ring", "ulysses")
    parallel.apply(model, dims, cfg)                      # swap VarlenAttention for SPAttention
    layout = parallel.shard_packed(cu_seqlens_N1, T, dims, cfg)   # per micro-batch
    model(layout.take(tokens, pad_id), layout.take(position_ids, 0), layout.attn_meta, ...)

Imports only `kernels` and torch (never `longtrain`).
"""

from parallel.adaptive import AdaptiveSPMeta, Placement, place_documents
from parallel.adaptive_cost import AdaptivePolicy, AttnShape, SPCostModel, SplitMethod
from parallel.apply import SPAttention, apply
from parallel.comm_stats import CommCost, CommStats, ring_cost, ulysses_cost, usp_cost
from parallel.dims import ParallelDims, valid_ulysses_degrees
from parallel.layout import ShardedLayout, SPMeta, check_method, shard_packed
from parallel.ring import ring_attn_varlen_func
from parallel.ring_allgather import ring_allgather_attn_varlen_func
from parallel.sharding import SPLayout
from parallel.ulysses import ulysses_attn_varlen_func
from parallel.usp import usp_attn_varlen_func

__all__ = [
    "AdaptivePolicy",
    "AdaptiveSPMeta",
    "Placement",
    "AttnShape",
    "SPCostModel",
    "SplitMethod",
    "place_documents",
    "check_method",
    "CommCost",
    "CommStats",
    "ParallelDims",
    "SPAttention",
    "SPLayout",
    "SPMeta",
    "ShardedLayout",
    "apply",
    "ring_allgather_attn_varlen_func",
    "ring_attn_varlen_func",
    "ring_cost",
    "shard_packed",
    "ulysses_attn_varlen_func",
    "ulysses_cost",
    "usp_attn_varlen_func",
    "usp_cost",
    "valid_ulysses_degrees",
]
