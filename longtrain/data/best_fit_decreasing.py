"""Best-Fit Decreasing (BFD) of item sizes into bins of capacity seq_len, one size class at a
time: the engine of `longtrain.data.packing.best_fit` (a bin is a sequence, an item a document
or the tail of one).

Open bins are grouped by their remaining room r in [1, seq_len-1] (full bins are forgotten).
Within a room value the bins form a FIFO queue (arrival order). For the c items of one size s,
processed one by one, BFD takes the bin of least room r >= s; after the item its room r - s is
smaller than any other room >= s, so the same bin keeps taking items until its room drops
below s. Hence a whole class moves in bulk: rooms r >= s are drained in ascending order, every
bin of room r taking r // s items and landing in room r % s; the last touched room may be
drained only in part (q bins take r // s items, one more takes the m items left and lands in
r - m*s); if items remain, new bins open, each taking seq_len // s items. Every destination is
< s or a room just drained, so the moves of a class never chain. Items above seq_len/2 come
first and each opens a bin (every open room is below seq_len/2 then): they all move in one
step. `_plan_classes` computes the moves on per-room counts; `_assign_bins` replays them with
bin identities taken from the per-room FIFO queues (sized by the plan, hence the two passes).

Every array is numpy int64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_I64 = np.int64


def best_fit_decreasing(
    sizes: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BFD of `sizes` (sorted non-increasing, each in [1, seq_len-1]) into bins of capacity
    seq_len.

    Returns:
        item_bin: [m] bin of each item, bins numbered in opening order from 0.
        item_rank: [m] position of the item inside its bin (placement order).
        bin_fill: [nb] items per bin.
    """
    if sizes.size == 0:
        return np.zeros(0, _I64), np.zeros(0, _I64), np.zeros(0, _I64)
    change = np.flatnonzero(sizes[1:] != sizes[:-1]) + 1
    starts = np.concatenate((np.zeros(1, _I64), change))
    class_counts = np.diff(np.concatenate((starts, [sizes.size])))
    plans, plan_items, arrivals, num_bins = _plan_classes(sizes[starts], class_counts, seq_len)
    return _assign_bins(plans, plan_items, arrivals, num_bins)


def _plan_classes(
    class_sizes: np.ndarray, class_counts: np.ndarray, seq_len: int
) -> tuple[list[tuple[Any, ...]], list[int], np.ndarray, int]:
    """Plan every class's bulk moves on per-room bin counts.

    Returns:
        plans: per step (gather_rooms, gather_bins, n_new, bins, items, dst): the step takes
            gather_bins[j] bins from the front of room gather_rooms[j]'s queue (ascending rooms),
            then opens n_new bins; in that order, move e covers the next bins[e] bins, each
            taking items[e] items and landing in room dst[e] (0: full).
        plan_items: items placed by each step (a class, or all classes above seq_len/2 at once).
        arrivals: [seq_len] bins that ever join each room's queue.
        num_bins: bins opened in all.
    """
    cnt = np.zeros(seq_len, _I64)  # open bins per room value (index 0 unused)
    arrivals = np.zeros(seq_len, _I64)
    # Items above seq_len/2 never share a sequence: every open room is then below seq_len/2.
    # One step opens a bin for each, in item order, landing in room seq_len - s.
    big = int(np.count_nonzero(2 * class_sizes > seq_len))
    b_sizes, b_counts = class_sizes[:big], class_counts[:big]
    cnt[seq_len - b_sizes] = b_counts
    arrivals[seq_len - b_sizes] = b_counts
    rooms_nz = seq_len - b_sizes  # sorted room values with cnt > 0 (sizes are descending)
    num_bins = int(b_counts.sum())
    plans: list[tuple[Any, ...]] = [
        (rooms_nz[:0], rooms_nz[:0], num_bins, b_counts, np.ones(big, _I64), seq_len - b_sizes)
    ]
    plan_items = [num_bins]
    for s, c in zip(class_sizes[big:].tolist(), class_counts[big:].tolist()):
        plan_items.append(c)
        i0 = int(rooms_nz.searchsorted(s))
        rooms, cum = _rooms_to_look_at(rooms_nz, cnt, i0, s, c)
        drained, rj, used, opened, extra = _class_moves(rooms, cum, s, c, seq_len)
        num_bins += opened
        drained_n, removed, fresh = _apply_moves(cnt, arrivals, drained, rj, used, extra, s)
        ex = np.array(extra, _I64).reshape(-1, 3)
        gather_rooms, gather_bins = drained, drained_n
        if used:
            gather_rooms = np.concatenate((drained, [rj]))
            gather_bins = np.concatenate((drained_n, [used]))
        plans.append(
            (
                gather_rooms,
                gather_bins,
                opened,
                np.concatenate((drained_n, ex[:, 0])),
                np.concatenate((drained // s, ex[:, 1])),
                np.concatenate((drained % s, ex[:, 2])),
            )
        )
        rooms_nz = _merge_rooms(rooms_nz, i0, removed, fresh)
    return plans, plan_items, arrivals, num_bins


def _rooms_to_look_at(
    rooms_nz: np.ndarray, cnt: np.ndarray, i0: int, s: int, c: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rooms, cum): the open rooms >= s from rooms_nz[i0] on, just enough of them to hold the
    c items of size s (or all), and the items they hold cumulatively (galloping look-ahead)."""
    avail = rooms_nz.size - i0
    w = 32
    while True:
        rooms = rooms_nz[i0 : i0 + w]
        cum = (cnt[rooms] * (rooms // s)).cumsum()
        if w >= avail or cum[-1] >= c:
            return rooms, cum
        w *= 4


def _class_moves(
    rooms: np.ndarray, cum: np.ndarray, s: int, c: int, seq_len: int
) -> tuple[np.ndarray, int, int, int, list[tuple[int, int, int]]]:
    """Where the c items of size s go.

    Returns:
        drained: rooms whose every bin is filled to below s.
        rj: the room drained only in part (0: none); used: its bins that take items.
        opened: new bins.
        extra: (bins, items each, destination room) moves after the drained rooms: the partly
            drained room's, then the new bins'.
    """
    total = int(cum[-1]) if cum.size else 0
    extra: list[tuple[int, int, int]] = []
    rj = used = left = 0
    if total >= c:
        j = int(cum.searchsorted(c))
        drained, rj = rooms[:j], int(rooms[j])
        kj = rj // s
        q, m = divmod(c - (int(cum[j - 1]) if j else 0), kj)
        if q:
            extra.append((q, kj, rj - kj * s))
        if m:
            extra.append((1, m, rj - m * s))
        used = q + (m > 0)
    else:
        drained, left = rooms, c - total
    if left:  # new bins, numbered after every open one
        per_new_bin = seq_len // s
        nf, mf = divmod(left, per_new_bin)
        if nf:
            extra.append((nf, per_new_bin, seq_len - per_new_bin * s))
        if mf:
            extra.append((1, mf, seq_len - mf * s))
        left = nf + (mf > 0)
    return drained, rj, used, left, extra


def _apply_moves(
    cnt: np.ndarray,
    arrivals: np.ndarray,
    drained: np.ndarray,
    rj: int,
    used: int,
    extra: list[tuple[int, int, int]],
    s: int,
) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """Apply one class's moves to the per-room counts `cnt` and `arrivals` (in place).

    Returns:
        drained_n: bins that each drained room held.
        removed: rooms >= s that are now empty (the drained ones, and rj if it emptied).
        fresh: arrays of rooms that became non-empty.
    """
    drained_n = cnt[drained]
    cnt[drained] = 0
    removed = drained.size
    fresh = []
    if drained.size:
        d = drained % s
        live = d > 0
        d, dn = d[live], drained_n[live]
        if d.size:
            u = np.unique(d)
            fresh.append(u[cnt[u] == 0])
            np.add.at(cnt, d, dn)
            np.add.at(arrivals, d, dn)
    if rj:
        cnt[rj] -= used
        removed += int(cnt[rj] == 0)
    for n_e, _, d_e in extra:
        if d_e:
            if cnt[d_e] == 0:
                fresh.append(np.array([d_e], _I64))
            cnt[d_e] += n_e
            arrivals[d_e] += n_e
    return drained_n, removed, fresh


def _merge_rooms(
    rooms_nz: np.ndarray, i0: int, removed: int, fresh: list[np.ndarray]
) -> np.ndarray:
    """The sorted non-empty rooms after a class: fresh rooms are below s or inside the drained
    range, so they all go between the rooms below s and the rooms left above the drained
    range."""
    low, high = rooms_nz[:i0], rooms_nz[i0 + removed :]
    if fresh:
        f = np.unique(np.concatenate(fresh)) if len(fresh) > 1 else fresh[0]
        at = low.searchsorted(f) + np.arange(f.size)
        merged = np.empty(low.size + f.size, _I64)
        keep = np.ones(merged.size, bool)
        keep[at] = False
        merged[at] = f
        merged[keep] = low
        low = merged
    return np.concatenate((low, high))


def _assign_bins(
    plans: list[tuple[Any, ...]],
    plan_items: list[int],
    arrivals: np.ndarray,
    num_bins: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replay the planned moves with bin identities; see `best_fit_decreasing` for outputs."""
    m = sum(plan_items)
    item_bin = np.empty(m, _I64)
    item_rank = np.empty(m, _I64)
    fill = np.zeros(num_bins, _I64)
    # One flat array holds every room's FIFO queue; head/tail are absolute positions in it.
    base = np.concatenate((np.zeros(1, _I64), arrivals.cumsum()))
    queues = np.empty(int(base[-1]), _I64)
    head = base[:-1].copy()
    tail = base[:-1].copy()
    next_bin = 0
    a = 0
    for (g_rooms, g_bins, n_new, nb, k, dst), c in zip(plans, plan_items):
        ids = np.arange(next_bin, next_bin + n_new, dtype=_I64)
        next_bin += n_new
        if g_rooms.size:
            g_cum = g_bins.cumsum()
            pos = np.repeat(head[g_rooms] + g_bins - g_cum, g_bins) + np.arange(int(g_cum[-1]))
            head[g_rooms] += g_bins
            ids = np.concatenate((queues[pos], ids))
        per_bin = np.repeat(k, nb)  # items each bin takes
        cum = per_bin.cumsum()
        item_bin[a : a + c] = np.repeat(ids, per_bin)
        item_rank[a : a + c] = np.arange(c) + np.repeat(fill[ids] + per_bin - cum, per_bin)
        fill[ids] += per_bin
        a += c
        # Bins that keep room join the back of their new room's queue, in processing order.
        dd = np.repeat(dst, nb)
        live = dd > 0
        dd, ids = dd[live], ids[live]
        if dd.size > 1:
            o = np.argsort(dd, kind="stable")
            dd, ids = dd[o], ids[o]
            idx = np.arange(dd.size)
            grp = np.ones(dd.size, bool)
            grp[1:] = dd[1:] != dd[:-1]
            rank = idx - np.maximum.accumulate(np.where(grp, idx, 0))
            queues[tail[dd] + rank] = ids
            np.add.at(tail, dd, 1)
        elif dd.size:
            queues[tail[dd]] = ids
            tail[dd] += 1
    return item_bin, item_rank, fill


__all__ = ["best_fit_decreasing"]
