"""Benchmark of the packers: speed (documents per second) and quality.

    python -m bench.packing [--num-docs 10000000] [--seq-len 8192] [--store DIR]

On synthetic heavy-tailed document lengths (lognormal, like real text) and, with `--store`, on
the lengths of a token store (the embedded corpus), it runs `concat_chunk`, `best_fit` and
`decompose`, and a straightforward pure-Python best-fit-decreasing (`reference_best_fit`, the
readable reference, for comparison only) on the first `--ref-docs` documents, whose rate is
extrapolated. It prints a table and writes JSON to `bench/results/packing.json`.

Quality columns: sequences (chunks for decompose), excess over ceil(tokens / seq_len), padding
as a share of sequence slots, documents cut at least once, and tokens dropped (decompose only).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import platform
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longtrain.data.decomposition import decompose
from longtrain.data.packing import Packing, best_fit, concat_chunk

RESULTS = Path(__file__).resolve().parent / "results" / "packing.json"


def reference_best_fit(doc_lengths: Sequence[int], seq_len: int) -> Packing:
    """Best-fit decreasing, one item at a time in pure Python (the readable reference).

    Same rule and tie-breaks as `longtrain.data.packing.best_fit`, hence the same output:
    heads of S tokens are sequences of their own; tails and short documents, longest first
    (ties: lower document id), go to the open sequence of least room that fits, the one that
    reached that room first; otherwise to a new sequence. Rooms with an open sequence are kept
    in a sorted list (bisect) and each room has a FIFO queue of its sequences.

    Args:
        doc_lengths: [n] non-negative integer tokens per document.
        seq_len: S >= 1.
    Returns:
        Packing equal to `best_fit(doc_lengths, seq_len)`.
    """
    S = int(seq_len)
    heads: list[list[tuple[int, int, int]]] = []
    items: list[tuple[int, int, int]] = []
    skipped = 0
    for d, length in enumerate(int(x) for x in doc_lengths):
        if length == 0:
            skipped += 1
            continue
        n_full, rem = divmod(length, S)
        heads.extend([(d, p * S, S)] for p in range(n_full))
        if rem:
            items.append((rem, d, n_full * S))
    items.sort(key=lambda t: (-t[0], t[1]))
    bins: list[list[tuple[int, int, int]]] = []
    queues: dict[int, deque[int]] = {}
    open_rooms: list[int] = []  # sorted rooms whose queue is not empty
    for size, d, start in items:
        i = bisect.bisect_left(open_rooms, size)
        if i < len(open_rooms):
            room = open_rooms[i]
            queue = queues[room]
            b = queue.popleft()
            if not queue:
                del open_rooms[i]
        else:
            room, b = S, len(bins)
            bins.append([])
        bins[b].append((d, start, size))
        left = room - size
        if left:
            queue = queues.get(left)
            if queue is None:
                queue = queues[left] = deque()
            if not queue:
                bisect.insort(open_rooms, left)
            queue.append(b)
    seqs = heads + bins
    chunks = [c for seq in seqs for c in seq]
    arr = np.array(chunks, dtype=np.int64).reshape(-1, 3)
    offsets = np.cumsum([0] + [len(seq) for seq in seqs], dtype=np.int64)
    return Packing(
        doc_ids=arr[:, 0].copy(),
        starts=arr[:, 1].copy(),
        lengths=arr[:, 2].copy(),
        seq_offsets=offsets,
        seq_len=S,
        num_skipped_docs=skipped,
    )


def synthetic_lengths(num_docs: int, seed: int = 0) -> np.ndarray:
    """[num_docs] int64 lognormal lengths (median ~400, mean ~940 tokens, heavy right tail)."""
    rng = np.random.default_rng(seed)
    return np.maximum(1, np.round(rng.lognormal(6.0, 1.3, num_docs))).astype(np.int64)


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """(result, best wall time of `repeat` runs in seconds): the least disturbed run."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _packing_row(p: Packing, lens: np.ndarray, seconds: float, docs_timed: int) -> dict:
    tokens = int(lens.sum())
    bound = -(-tokens // p.seq_len)
    return {
        "seconds": seconds,
        "docs_per_s": docs_timed / seconds,
        "sequences": p.num_sequences,
        "lower_bound": bound,
        "excess_pct": 100.0 * (p.num_sequences - bound) / max(bound, 1),
        "padding_pct": 100.0 * p.padding_tokens / max(p.num_sequences * p.seq_len, 1),
        "truncated_docs": p.num_truncated_docs,
        "truncations": p.num_truncations,
        "dropped_tokens": 0,
    }


def bench_lengths(
    lens: np.ndarray, seq_len: int, ref_docs: int, min_log2: int, repeat: int = 3
) -> dict:
    """Run every packer on `lens` (best of `repeat` runs); the reference on the first
    `ref_docs` documents."""
    rows: dict[str, dict] = {}
    p, dt = _timed(lambda: concat_chunk(lens, seq_len), repeat)
    rows["concat_chunk"] = _packing_row(p, lens, dt, lens.size)
    p, dt = _timed(lambda: best_fit(lens, seq_len), repeat)
    rows["best_fit"] = _packing_row(p, lens, dt, lens.size)
    max_log2 = seq_len.bit_length() - 1  # largest power of two <= seq_len
    d, dt = _timed(lambda: decompose(lens, min(min_log2, max_log2), max_log2), repeat)
    chunks = sum(d.chunks_per_bucket().values())
    multi = np.zeros(lens.size, np.int64)
    for doc_ids, _ in d.buckets.values():
        multi += np.bincount(doc_ids, minlength=lens.size)
    rows["decompose"] = {
        "seconds": dt,
        "docs_per_s": lens.size / dt,
        "sequences": chunks,
        "lower_bound": None,
        "excess_pct": None,
        "padding_pct": 0.0,
        "truncated_docs": int(np.count_nonzero(multi > 1)),
        "truncations": int((multi - (multi > 0)).sum()),
        "dropped_tokens": d.dropped_tokens,
        "min_log2": min(min_log2, max_log2),
        "max_log2": max_log2,
    }
    sub = lens[:ref_docs]
    ref, dt_ref = _timed(lambda: reference_best_fit(sub.tolist(), seq_len), repeat)
    rows["reference_best_fit"] = _packing_row(ref, sub, dt_ref, sub.size)
    rows["reference_best_fit"]["docs"] = int(sub.size)
    fast, dt_fast = _timed(lambda: best_fit(sub, seq_len), repeat)
    rows["best_fit_on_reference_subset"] = _packing_row(fast, sub, dt_fast, sub.size)
    rows["best_fit_on_reference_subset"]["docs"] = int(sub.size)
    same = all(
        np.array_equal(getattr(ref, f), getattr(fast, f))
        for f in ("doc_ids", "starts", "lengths", "seq_offsets")
    )
    fast.validate(sub)
    return {
        "num_docs": int(lens.size),
        "num_tokens": int(lens.sum()),
        "seq_len": seq_len,
        "methods": rows,
        "best_fit_equals_reference_on_subset": same,
        "best_fit_speedup_vs_reference": rows["best_fit"]["docs_per_s"]
        / rows["reference_best_fit"]["docs_per_s"],
    }


_COLUMNS = (  # header, width, format, row key
    ("method", 30, "<", "method"),
    ("docs", 12, ",", "docs"),
    ("s", 8, ".2f", "seconds"),
    ("docs/s", 13, ",.0f", "docs_per_s"),
    ("seqs", 12, ",", "sequences"),
    ("excess%", 9, ".4f", "excess_pct"),
    ("pad%", 8, ".3f", "padding_pct"),
    ("cut docs", 12, ",", "truncated_docs"),
    ("dropped", 15, ",", "dropped_tokens"),
)


def print_table(name: str, res: dict) -> None:
    """Print one dataset's results as an aligned table."""
    print(
        f"\n{name}: {res['num_docs']:,} docs, {res['num_tokens']:,} tokens, "
        f"seq_len {res['seq_len']}"
    )
    print("".join(f"{h:<{w}}" if k == "method" else f"{h:>{w}}" for h, w, _, k in _COLUMNS))
    for method, r in res["methods"].items():
        row = dict(r, method=method, docs=r.get("docs", res["num_docs"]))
        cells = []
        for _, w, spec, key in _COLUMNS:
            v = row[key]
            cells.append(
                f"{v:{spec}{w}}"
                if key == "method"
                else f"{'-' if v is None else format(v, spec):>{w}}"
            )
        print("".join(cells))
    print(
        f"best_fit is {res['best_fit_speedup_vs_reference']:.1f}x the reference's docs/s; "
        f"identical output on the subset: {res['best_fit_equals_reference_on_subset']}"
    )


def _store_lengths(path: str) -> np.ndarray | None:
    try:
        from longtrain.data.token_store import TokenStore
    except ImportError:
        print("longtrain.data.token_store is not available: skipping --store")
        return None
    return np.asarray(TokenStore.open(path, check_tokens=False).doc_lengths, dtype=np.int64)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse arguments, run the benchmark, print the tables, write the JSON; return it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-docs", type=int, default=10_000_000, help="synthetic documents")
    ap.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence")
    ap.add_argument("--ref-docs", type=int, default=200_000, help="documents for the reference")
    ap.add_argument("--min-log2", type=int, default=8, help="smallest decompose bucket")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic lengths")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (the best counts)")
    ap.add_argument("--store", default=None, help="token store directory (optional)")
    ap.add_argument("--out", default=str(RESULTS), help="JSON output path")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {
        "benchmark": "packing",
        "args": vars(args),
        "machine": {"python": platform.python_version(), "numpy": np.__version__},
        "datasets": {},
    }
    datasets = {"synthetic_lognormal": synthetic_lengths(args.num_docs, args.seed)}
    if args.store:
        lens = _store_lengths(args.store)
        if lens is not None:
            datasets["store"] = lens
    for name, lens in datasets.items():
        res = bench_lengths(lens, args.seq_len, args.ref_docs, args.min_log2, args.repeat)
        out["datasets"][name] = res
        print_table(name, res)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
