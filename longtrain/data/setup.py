"""From the data config to a loader: token store (built once, by rank 0), schedule, loader."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from longtrain.config import EMBEDDED_STORE_DIR, DataConfig, RunConfig
from longtrain.config.rules import check_global_batch, stage_batch
from longtrain.data.curriculum import Stage
from longtrain.data.decomposition import decompose
from longtrain.data.loader import PackedLoader
from longtrain.data.packing import best_fit, concat_chunk
from longtrain.data.prepare import prepare, store_source
from longtrain.data.schedule import (
    DecompositionSchedule,
    FixedLengthSchedule,
    StagedSchedule,
    StageSpec,
)
from longtrain.data.token_store import TokenStore
from longtrain.data.tokenizer import load_tokenizer
from longtrain.data.validation import split_documents, train_packer
from longtrain.errors import DataError

PACKERS = {"concat_chunk": concat_chunk, "best_fit": best_fit}


def resolve_token_store(cfg: DataConfig, show_progress: bool = True) -> TokenStore:
    """The token store `cfg` names: built, reused or used as it is (run by rank 0 only).

    - data.source named: `prepare` builds a missing store (or fills an empty directory),
      reuses one that source built from the same inputs, rebuilds it when they changed
      (edited files, another tokenizer or limit), and refuses one that another source built
      unless data.replace_store=true.
    - no source, and data.store_dir is the embedded corpus' store (EMBEDDED_STORE_DIR,
      relative to the current directory): as if data.source=stdlib, so a fresh machine builds
      it on first use.
    - no source, any other data.store_dir: the store there is used as it is (opened,
      validated, one line printed saying what it holds). None there is an error naming
      data.source; so is a data.tokenizer or data.limit_docs that its header contradicts.

    An empty data.tokenizer means the store's own, and the byte tokenizer when building.
    """
    source = cfg.source
    if not source and Path(cfg.store_dir).resolve() == Path(EMBEDDED_STORE_DIR).resolve():
        source = "stdlib"
    if source:
        return prepare(
            source,
            cfg.store_dir,
            tokenizer=cfg.tokenizer or "byte",
            limit_docs=cfg.limit_docs or None,
            show_progress=show_progress,
            replace=cfg.replace_store,
            train_on=cfg.train_on,
        )
    path = Path(cfg.store_dir)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise DataError(
            f"there is no token store at data.store_dir={cfg.store_dir!r} and no data.source "
            "to build it from: name one (data.source=stdlib, dir:PATH or jsonl:PATH) to build "
            "it there, or point data.store_dir at an existing store"
        )
    store = TokenStore.open(path)
    _check_store_matches(store, cfg)
    print(
        f"token store {cfg.store_dir}: built from {store_source(store.header)}, "
        f"{store.num_docs} docs, {store.num_tokens} tokens, "
        f"tokenizer {store.tokenizer_spec.get('name', '?')}",
        flush=True,
    )
    return store


def tokenizer_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What makes two tokenizer specs the same tokenizer: the same files in another
    directory are."""
    return {k: v for k, v in spec.items() if k not in ("name", "path")}


def _check_store_matches(store: TokenStore, cfg: DataConfig) -> None:
    """Refuse a data.tokenizer / data.limit_docs / data.train_on that the store's header
    contradicts."""
    built = f"the token store at {cfg.store_dir!r} (built from {store_source(store.header)!r}"
    fix = "drop it to train on the store as it is, or name data.source=... to build another store"
    if cfg.tokenizer:
        want = load_tokenizer(cfg.tokenizer).spec()
        if tokenizer_identity(want) != tokenizer_identity(store.tokenizer_spec):
            raise DataError(
                f"data.tokenizer={cfg.tokenizer!r} disagrees with {built} with tokenizer "
                f"{store.tokenizer_spec.get('name', '?')!r}); {fix}"
            )
    meta = store.header.get("meta")
    had = meta.get("limit_docs") if isinstance(meta, dict) else None
    if cfg.limit_docs and had != cfg.limit_docs:
        raise DataError(
            f"data.limit_docs={cfg.limit_docs} disagrees with {built} with limit_docs "
            f"{had or 'none (all documents)'}); {fix}"
        )
    trained_on = meta.get("train_on") if isinstance(meta, dict) else None
    if trained_on is not None and trained_on != cfg.train_on:
        raise DataError(
            f"data.train_on={cfg.train_on} disagrees with {built}, prepared with train_on="
            f"{trained_on}); name its data.source to rebuild it with train_on={cfg.train_on}, "
            f"or set data.train_on={trained_on}"
        )


def build_schedule(store: TokenStore, cfg: RunConfig):
    """The step -> sequences schedule the data config describes (checked by
    `longtrain.config.rules`: a known packing, stages that divide, a power-of-two seq_len
    for decomposition)."""
    data, seed = cfg.data, cfg.train.seed
    tokens_per_step = cfg.train.global_batch * data.seq_len
    train_ids, _ = split_documents(store.num_docs, data.val_fraction)  # held-out docs never train
    if data.stages:
        packer = train_packer(PACKERS[data.packing], train_ids)
        specs = [
            StageSpec(Stage(st.steps, st.seq_len, st.rope_theta), stage_batch(st, tokens_per_step))
            for st in data.stages
        ]
        return StagedSchedule(specs, store.doc_lengths, packer, seed, data.shuffle)
    if data.packing == "decomposition":
        max_log2 = data.max_log2 or int(math.log2(data.seq_len))
        dec = decompose(store.doc_lengths[train_ids], data.min_log2, max_log2)
        if data.val_fraction:
            buckets = {i: (train_ids[d], s) for i, (d, s) in dec.buckets.items()}
            dec = replace(dec, buckets=buckets)
        return DecompositionSchedule(
            dec, tokens_per_step, data.curriculum, data.curriculum_cycles, seed
        )
    packing = train_packer(PACKERS[data.packing], train_ids)(store.doc_lengths, data.seq_len)
    return FixedLengthSchedule(packing, cfg.train.global_batch, seed, data.shuffle)


def build_loader(store: TokenStore, cfg: RunConfig, dp_rank: int, dp_size: int) -> PackedLoader:
    """The loader of data-parallel rank `dp_rank`'s share (of `dp_size`)."""
    check_global_batch(cfg.train.global_batch, dp_size)
    return PackedLoader(
        store.tokens,
        store.offsets,
        build_schedule(store, cfg),
        dp_rank=dp_rank,
        dp_size=dp_size,
        pad_id=store.pad_id,
        micro_tokens=cfg.train.micro_batch * cfg.data.seq_len,
        balance=cfg.data.balance,
        loss_weighting=cfg.data.loss_weighting,
        prefetch=cfg.data.prefetch,
        loss_mask=store.loss_mask,
    )
