"""Corpus preparation: documents -> tokenizer -> token store, built once and reused.

    python -m longtrain.data.prepare --source stdlib --out data_cache/stdlib --tokenizer byte

Each stored document is the tokenizer's encoding of one source document followed by EOS.
The store's header keeps a fingerprint of the inputs (source spec, tokenizer spec, document
limit, and for file sources the sorted list of (path, size, mtime)); `prepare` returns the
existing store when the fingerprint matches and rebuilds it (atomically) when it does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from longtrain.data.sources import Source, open_source
from longtrain.data.token_store import VERSION, TokenStore, TokenStoreWriter
from longtrain.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the text -> tokens recipe changes, so old stores rebuild


def fingerprint(source: Source, tokenizer: Tokenizer, limit_docs: int | None) -> str:
    """sha256 hex of everything that determines the store's content.

    Args:
        source: the parsed source (its kind, resolved root, pattern/field and file stats).
        tokenizer: its `spec()` is hashed.
        limit_docs: None (all documents) or a positive count.
    Returns:
        64-character hex string.
    """
    ident = {
        "prepare_version": PREPARE_VERSION,
        "store_version": VERSION,
        "source": {
            "kind": source.kind,
            "root": str(source.root.resolve()),
            "pattern": source.pattern,
            "field": source.field,
        },
        "tokenizer": tokenizer.spec(),
        "limit_docs": limit_docs,
        "files": source.file_stats(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _existing(out_dir: Path, fp: str) -> TokenStore | None:
    """The store at out_dir if it is valid and built from the same inputs, else None."""
    if not out_dir.exists():
        return None
    try:
        store = TokenStore.open(out_dir)
    except (FileNotFoundError, ValueError) as e:
        log.warning("rebuilding token store %s: %s", out_dir, e)
        return None
    if store.header.get("fingerprint") != fp:
        log.info("rebuilding token store %s: inputs changed", out_dir)
        return None
    return store


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: str = "byte",
    limit_docs: int | None = None,
    show_progress: bool = True,
    force: bool = False,
) -> TokenStore:
    """Build (or reuse) the token store of a corpus.

    Args:
        source: "stdlib", "dir:PATH" (every **/*.txt under PATH) or "jsonl:PATH" (a .jsonl
            file or a directory of them, text in field "text").
        out_dir: store directory; replaced atomically when rebuilt.
        tokenizer: "byte" or a local Hugging Face tokenizer directory.
        limit_docs: None or 0 for every document, else the first N non-empty documents in
            the source's deterministic order.
        show_progress: draw a tqdm progress bar (documents) on stderr.
        force: rebuild even if a store from the same inputs exists.
    Returns:
        the opened, validated TokenStore at out_dir.
    Raises:
        FileNotFoundError: a missing source path or tokenizer directory.
        ValueError: a bad spec or limit, an empty corpus, a malformed JSONL line.
    """
    if limit_docs is not None and limit_docs < 0:
        raise ValueError(f"limit_docs must be None, 0 (all) or positive, got {limit_docs}")
    limit = limit_docs or None
    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer)
    src = open_source(source)
    fp = fingerprint(src, tok, limit)
    if not force and (store := _existing(out_dir, fp)) is not None:
        log.info("reusing token store %s (%d docs)", out_dir, store.num_docs)
        return store

    total = len(src.files) if src.kind != "jsonl" else None
    if total is not None and limit is not None:
        total = min(total, limit)
    meta: dict[str, Any] = {"source": source, "limit_docs": limit, "prepare": PREPARE_VERSION}
    eos = np.array([tok.eos_id], dtype=np.int64)
    with (
        TokenStoreWriter(out_dir, tok.vocab_size, tok.spec(), fingerprint=fp, meta=meta) as w,
        tqdm(total=total, unit="doc", desc=f"prepare {source}", disable=not show_progress) as bar,
    ):
        for _name, text in src.documents():
            ids = tok.encode(text)
            # A text that encodes to nothing is skipped by the writer (counted in its header).
            w.append(np.concatenate([ids, eos]) if ids.size else ids)
            bar.update(1)
            if limit is not None and w.num_docs >= limit:
                break
        bar.total = bar.n  # empty/unreadable files are no documents: end the bar at 100%
        bar.refresh()
    return TokenStore.open(out_dir)


def summarize(store: TokenStore) -> dict[str, Any]:
    """Document-length statistics of a store (lengths in tokens, size in bytes on disk)."""
    lengths = store.doc_lengths
    size = sum(f.stat().st_size for f in store.path.iterdir() if f.is_file())
    return {
        "path": str(store.path),
        "docs": store.num_docs,
        "tokens": store.num_tokens,
        "median_len": float(np.median(lengths)),
        "p99_len": float(np.percentile(lengths, 99)),
        "max_len": int(lengths.max()),
        "vocab_size": store.vocab_size,
        "dtype": store.header["dtype"],
        "bytes": size,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: build or reuse a token store and print a summary."""
    p = argparse.ArgumentParser(
        prog="python -m longtrain.data.prepare",
        description="Tokenize a corpus into a token store (reused when the inputs are unchanged).",
    )
    p.add_argument("--source", default="stdlib", help="stdlib | dir:PATH | jsonl:PATH")
    p.add_argument("--out", required=True, help="token store directory")
    p.add_argument("--tokenizer", default="byte", help="byte | local HF tokenizer directory")
    p.add_argument("--limit-docs", type=int, default=0, help="first N documents (0: all)")
    p.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    store = prepare(
        args.source,
        args.out,
        tokenizer=args.tokenizer,
        limit_docs=args.limit_docs,
        show_progress=not args.no_progress,
        force=args.force,
    )
    s = summarize(store)
    print(
        f"token store {s['path']}: {s['docs']} docs, {s['tokens']} tokens ({s['dtype']}, "
        f"vocab {s['vocab_size']}, {s['bytes'] / 2**20:.1f} MiB)\n"
        f"doc length (tokens): median {s['median_len']:.0f}, p99 {s['p99_len']:.0f}, "
        f"max {s['max_len']}\n"
        f"seconds: {time.perf_counter() - t0:.2f}"
    )


if __name__ == "__main__":
    main()
