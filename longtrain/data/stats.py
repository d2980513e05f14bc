"""`python -m longtrain.data.stats --store DIR --seq-len N`: how each packer treats a corpus.

Prints, side by side for concat-chunk, best-fit and dataset decomposition: sequences, padding,
truncated documents, average attention context (sum l(l-1)/2 / sum l over the pieces the
model sees), causal attention FLOPs per layer and head dim unit, and packing time.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from longtrain.data.decomposition import decompose
from longtrain.data.packing import best_fit, concat_chunk
from longtrain.data.token_store import TokenStore
from longtrain.errors import report_errors


def _context_stats(piece_lengths: np.ndarray) -> tuple[float, float]:
    """(average context, causal attended pairs) over pieces of these lengths."""
    l = piece_lengths.astype(np.float64)
    pairs = float((l * (l + 1) / 2).sum())
    return float((l * (l - 1) / 2).sum() / max(l.sum(), 1.0)), pairs


def packer_stats(doc_lengths: np.ndarray, seq_len: int, min_log2: int = 6) -> list[dict]:
    """One row per packer: sequences, padding %, truncated docs, average context, attention
    pairs (x 4 x heads x head_dim = forward FLOPs per layer), seconds to pack."""
    rows = []
    for name, fn in (("concat_chunk", concat_chunk), ("best_fit", best_fit)):
        t0 = time.perf_counter()
        packing = fn(doc_lengths, seq_len)
        seconds = time.perf_counter() - t0
        ctx, pairs = _context_stats(packing.lengths)
        rows.append({
            "packer": name,
            "sequences": packing.num_sequences,
            "padding_pct": 100.0 * packing.padding_tokens / max(packing.num_sequences * seq_len, 1),
            "truncated_docs": packing.num_truncated_docs,
            "avg_context": ctx,
            "attn_pairs": pairs,
            "seconds": seconds,
        })  # fmt: skip
    t0 = time.perf_counter()
    dec = decompose(doc_lengths, min_log2, int(math.log2(seq_len)))
    seconds = time.perf_counter() - t0
    pieces = np.concatenate(
        [np.full(d.size, 1 << i, dtype=np.int64) for i, (d, _) in dec.buckets.items()]
    )
    ctx, pairs = _context_stats(pieces)
    per_doc = np.bincount(np.concatenate([d for d, _ in dec.buckets.values()]),
                          minlength=len(doc_lengths))  # fmt: skip
    rows.append({
        "packer": f"decomposition[2^{min_log2}..{seq_len}]",
        "sequences": int(pieces.size),
        "padding_pct": 0.0,
        "truncated_docs": int((per_doc > 1).sum()),
        "avg_context": ctx,
        "attn_pairs": pairs,
        "seconds": seconds,
        "dropped_tokens": int(dec.dropped_tokens),
    })  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'packer':<28}{'seqs':>10}{'pad %':>8}{'trunc docs':>12}{'avg ctx':>10}"
    head += f"{'attn pairs':>14}{'s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['packer']:<28}{r['sequences']:>10}{r['padding_pct']:>8.2f}"
            f"{r['truncated_docs']:>12}{r['avg_context']:>10.1f}{r['attn_pairs']:>14.3e}"
            f"{r['seconds']:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: print the packer table of a store; a user error is one line on stderr, exit 2."""
    report_errors("longtrain.data.stats", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="token store directory")
    parser.add_argument("--seq-len", type=int, default=8192, help="power of two")
    parser.add_argument("--min-log2", type=int, default=6)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.seq_len < 2 or args.seq_len & (args.seq_len - 1):
        parser.error(f"--seq-len {args.seq_len} must be a power of two >= 2 (decomposition)")
    store = TokenStore.open(args.store, check_tokens=False)
    rows = packer_stats(store.doc_lengths, args.seq_len, args.min_log2)
    print(f"{store.num_docs} documents, {store.num_tokens} tokens, seq_len {args.seq_len}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
