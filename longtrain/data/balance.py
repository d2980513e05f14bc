"""Assign a step's sequences to data-parallel ranks so that attention cost is balanced.

Attention cost of a sequence is sum over its documents of l^2 (causal pairs ~ l^2 / 2), so two
sequences of equal length can differ many-fold. Every rank must get the same number of
sequences (equal micro-batch counts keep the ranks' collectives in step), so this is
balanced partitioning with a cardinality constraint, solved greedily (LPT): heaviest first,
each to the lightest rank that still has room. Deterministic: ties go to the lower rank.
"""

from __future__ import annotations

import numpy as np


def balanced_assignment(costs: np.ndarray, num_ranks: int) -> list[np.ndarray]:
    """Split indices 0..S-1 (S sequences, divisible by num_ranks) into num_ranks groups of
    S/num_ranks, balancing the sum of `costs` (float or int [S]). Each group is returned
    sorted."""
    n = len(costs)
    if n % num_ranks:
        raise ValueError(f"{n} sequences cannot be split evenly over {num_ranks} ranks")
    per_rank = n // num_ranks
    load = np.zeros(num_ranks, dtype=np.float64)
    room = np.full(num_ranks, per_rank)
    groups: list[list[int]] = [[] for _ in range(num_ranks)]
    for idx in np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable"):
        candidates = np.flatnonzero(room > 0)
        r = int(candidates[np.argmin(load[candidates])])
        groups[r].append(int(idx))
        load[r] += costs[idx]
        room[r] -= 1
    return [np.array(sorted(g), dtype=np.int64) for g in groups]


def sequence_costs(packing, seq_ids: np.ndarray) -> np.ndarray:
    """Attention cost (sum of squared chunk lengths) of each sequence in `seq_ids` (int64 [S])."""
    sq = packing.lengths.astype(np.float64) ** 2
    cum = np.concatenate([[0.0], np.cumsum(sq)])
    return cum[packing.seq_offsets[seq_ids + 1]] - cum[packing.seq_offsets[seq_ids]]


def imbalance(costs: np.ndarray, groups: list[np.ndarray]) -> float:
    """max / mean of the groups' summed costs (1.0 is perfect)."""
    loads = np.array([costs[g].sum() for g in groups])
    return float(loads.max() / loads.mean()) if loads.mean() > 0 else 1.0
