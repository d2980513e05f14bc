"""Corpus preparation: documents -> tokenizer -> token store, built once and reused.

    python -m longtrain.data.prepare --source stdlib --out data_cache/stdlib --tokenizer byte

Each stored document is the tokenizer's encoding of one source document followed by EOS.
The store's header keeps a fingerprint of the inputs (source spec, tokenizer spec, document
limit, and for file sources the sorted list of (path, size, mtime)) and which source built it
(meta "source_id", see `longtrain.data.sources.source_identity`). With a store already at the
output, `prepare`

- reuses it when the same source built it and the fingerprint matches (unless `force`);
- rebuilds it, atomically, when that source's inputs changed (edited files, another tokenizer
  or limit), or when `force`;
- refuses (DataError naming both sources) when another source built it, unless `replace`.

The output never overlaps the source, and only a missing path, an empty directory or one of
our stores holding nothing else is ever written (`check_replaceable`): both are checked before
any tokenizing. Documents stream through in pieces (`Source.document_chunks`,
`Tokenizer.encode_chunks`, `TokenStoreWriter.extend`), so memory does not grow with the size
of a document (for the byte tokenizer; a Hugging Face tokenizer needs each document whole).
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

from longtrain.data.chat import TRAIN_ON, encode_record
from longtrain.data.sources import Source, open_source, source_identity
from longtrain.data.token_store import (
    VERSION,
    TokenStore,
    TokenStoreWriter,
    check_replaceable,
    read_header,
)
from longtrain.data.tokenizer import Tokenizer, load_tokenizer
from longtrain.errors import DataError, report_errors

log = logging.getLogger(__name__)

PREPARE_VERSION = 1  # bump when the text -> tokens recipe changes, so old stores rebuild
REPLACE_HINT = (
    "choose another output directory, or allow replacing that store "
    "(`python -m longtrain.data.prepare --replace`, or data.replace_store=true when training)"
)


def fingerprint(
    source: Source, tokenizer: Tokenizer, limit_docs: int | None, train_on: str = "assistant"
) -> str:
    """sha256 hex of everything that determines the store's content.

    Args:
        source: the parsed source (its kind, resolved root, pattern/field and file stats).
        tokenizer: its `spec()` is hashed.
        limit_docs: None (all documents) or a positive count.
        train_on: which tokens of chat records are trained (JSONL sources; see `chat`).
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
    if source.kind == "jsonl":
        ident["train_on"] = train_on
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def store_source(header: dict[str, Any]) -> str:
    """The source spec a store's header says it was built from ("an unknown source" if none)."""
    meta = header.get("meta")
    spec = meta.get("source") if isinstance(meta, dict) else None
    return spec if isinstance(spec, str) and spec else "an unknown source"


def _built_from(header: dict[str, Any]) -> dict[str, Any] | None:
    """The identity of the source that built a store: meta "source_id", or for stores written
    before it existed, the identity of meta "source" (paths resolved against the current
    directory); None when the header names no source."""
    meta = header.get("meta")
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("source_id"), dict):
        return meta["source_id"]
    spec = meta.get("source")
    return source_identity(spec) if isinstance(spec, str) and spec else None


def _check_same_source(out_dir: Path, header: dict[str, Any], src: Source, replace: bool) -> None:
    """Refuse to replace a store built from another source, unless `replace`."""
    if _built_from(header) == src.identity():
        return
    old = store_source(header)
    old = repr(old) if _built_from(header) is not None else old
    what = f"the token store at {str(out_dir)!r} was built from {old}, not from {src.spec!r}"
    if not replace:
        raise DataError(f"{what}: refusing to replace it; {REPLACE_HINT}")
    log.warning("%s: replacing it, as asked", what)


def _check_no_overlap(src: Source, out_dir: Path) -> None:
    """Refuse an output that is the source, lies inside it, or contains it."""
    out, loc = out_dir.resolve(), src.location
    if out == loc or out.is_relative_to(loc) or loc.is_relative_to(out):
        raise DataError(
            f"output {str(out_dir)!r} overlaps the source {src.spec!r} ({str(loc)!r}): a token "
            "store may not be its source, lie inside it, or contain it; choose an output "
            "directory outside it"
        )


def _existing(out_dir: Path, fp: str) -> TokenStore | None:
    """The store at out_dir if it is valid and built from the same inputs, else None."""
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
    replace: bool = False,
    train_on: str = "assistant",
) -> TokenStore:
    """Build (or reuse) the token store of a corpus.

    Args:
        source: "stdlib", "dir:PATH" (every **/*.txt under PATH) or "jsonl:PATH" (a .jsonl
            file or a directory of them, text in field "text").
        out_dir: store directory: missing, empty, or a store (replaced atomically when
            rebuilt); never the source, inside it, or containing it.
        tokenizer: "byte" ("" too) or a local Hugging Face tokenizer directory.
        limit_docs: None or 0 for every document, else the first N non-empty documents in
            the source's deterministic order.
        show_progress: draw a tqdm progress bar (documents) on stderr.
        force: rebuild even if a store from the same inputs exists.
        replace: allow replacing a store at out_dir that another source built (without it,
            that is refused: a user's store is never replaced by accident).
        train_on: JSONL chat and prompt/completion records (`longtrain.data.chat`):
            "assistant" trains on assistant turns and completions only (the store gets a
            loss mask), "all" on every token.
    Returns:
        the opened, validated TokenStore at out_dir.
    Raises:
        FileNotFoundError: a missing source path or tokenizer directory.
        DataError: out_dir is not ours to write (a user's files, a store with other files in
            it, another source's store without `replace`) or overlaps the source; a line of a
            JSONL file is not UTF-8.
        ValueError: a bad spec or limit, an empty corpus, a malformed JSONL line.
    """
    if limit_docs is not None and limit_docs < 0:
        raise ValueError(f"limit_docs must be None, 0 (all) or positive, got {limit_docs}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on {train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    limit = limit_docs or None
    out_dir = Path(out_dir)
    src = open_source(source)
    _check_no_overlap(src, out_dir)
    header = read_header(out_dir)
    if header is not None:
        _check_same_source(out_dir, header, src, replace)
    tok = load_tokenizer(tokenizer or "byte")
    fp = fingerprint(src, tok, limit, train_on)
    if header is not None and not force and (store := _existing(out_dir, fp)) is not None:
        log.info("reusing token store %s (%d docs)", out_dir, store.num_docs)
        return store
    check_replaceable(out_dir)  # before any tokenizing; the writer checks again at the swap

    total = len(src.files) if src.kind != "jsonl" else None
    if total is not None and limit is not None:
        total = min(total, limit)
    meta: dict[str, Any] = {
        "source": source,
        "source_id": src.identity(),
        "limit_docs": limit,
        "prepare": PREPARE_VERSION,
    }
    if src.kind == "jsonl":
        meta["train_on"] = train_on
    with (
        TokenStoreWriter(out_dir, tok.vocab_size, tok.spec(), fingerprint=fp, meta=meta) as w,
        tqdm(total=total, unit="doc", desc=f"prepare {source}", disable=not show_progress) as bar,
    ):
        eos = np.array([tok.eos_id], dtype=w.dtype)
        for chunks, chat in _documents(src):
            w.begin_document()
            if chat is None:
                for ids in tok.encode_chunks(chunks, w.dtype):
                    w.extend(ids)
                if w.doc_tokens:  # a text that encodes to nothing is skipped (counted)
                    w.extend(eos)
            else:
                ids, mask = encode_record(chat[1], tok, train_on, where=chat[0])
                if train_on != "all":
                    w.enable_loss_mask()  # the first such record: earlier tokens all train
                w.extend(ids.astype(w.dtype), mask if w.has_loss_mask else None)
            w.end_document()
            bar.update(1)
            if limit is not None and w.num_docs >= limit:
                break
        bar.total = bar.n  # empty/unreadable files are no documents: end the bar at 100%
        bar.refresh()
    return TokenStore.open(out_dir)


def _documents(src: Source):
    """(text pieces, None) of each text document (a file's text streams in pieces); (None,
    (where, record)) of each JSONL chat or prompt/completion record."""
    if src.kind != "jsonl":
        for _name, chunks in src.document_chunks():
            yield chunks, None
        return
    for _name, where, record in src.records():
        if record.kind == "text":
            yield iter((record.text,)), None
        else:
            yield None, (where, record)


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
        "trained_tokens": int(store.header.get("trained_tokens", store.num_tokens)),
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: build or reuse a token store and print a summary; a user error is one line on
    stderr and exit status 2."""
    report_errors("longtrain.data.prepare", lambda: _main(argv))


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m longtrain.data.prepare",
        description="Tokenize a corpus into a token store (reused when the inputs are unchanged).",
    )
    p.add_argument("--source", required=True, help="stdlib | dir:PATH | jsonl:PATH")
    p.add_argument("--out", required=True, help="token store directory (new, empty, or a store)")
    p.add_argument("--tokenizer", default="byte", help="byte | local HF tokenizer directory")
    p.add_argument("--limit-docs", type=int, default=0, help="first N documents (0: all)")
    p.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    p.add_argument(
        "--replace", action="store_true", help="allow replacing a store built from another source"
    )
    p.add_argument(
        "--train-on",
        choices=("assistant", "all"),
        default="assistant",
        help="JSONL chat / prompt-completion records: train on assistant turns and "
        "completions only (a loss mask), or on every token",
    )
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
        replace=args.replace,
        train_on=args.train_on,
    )
    s = summarize(store)
    print(
        f"token store {s['path']}: {s['docs']} docs, {s['tokens']} tokens ({s['dtype']}, "
        f"vocab {s['vocab_size']}, {s['bytes'] / 2**20:.1f} MiB)\n"
        f"doc length (tokens): median {s['median_len']:.0f}, p99 {s['p99_len']:.0f}, "
        f"max {s['max_len']}\n"
        f"trained tokens: {s['trained_tokens']} ({s['trained_tokens'] / s['tokens']:.1%})\n"
        f"seconds: {time.perf_counter() - t0:.2f}"
    )


if __name__ == "__main__":
    main()
