"""This rank's data: the token store (built or checked by rank 0 alone) and its loader."""

from __future__ import annotations

from dataclasses import replace

from longtrain.config import DataConfig, RunConfig
from longtrain.data.loader import PackedLoader
from longtrain.data.setup import build_loader, resolve_token_store, tokenizer_identity
from longtrain.data.token_store import TokenStore
from longtrain.distributed import DistEnv, broadcast_object
from longtrain.errors import DataError, LongtrainError, one_line

# What rank 0 reports to every rank as a DataError; anything else is a bug and keeps its
# traceback on rank 0 (the other ranks still raise, with its one-line message).
_USER_ERRORS = (LongtrainError, ValueError, OSError, ImportError)


def open_token_store(cfg: DataConfig, env: DistEnv) -> TokenStore:
    """Open the token store the data config names (`resolve_token_store` says how).

    Rank 0 builds or checks it while the others wait; rank 0 then broadcasts None or its
    error's message, so every rank opens the store or raises the same DataError (no rank is
    left waiting for a peer that failed)."""
    store, error, failure = None, None, None
    if env.is_main:
        try:
            store = resolve_token_store(cfg)
        except Exception as err:  # every failure must reach the other ranks before we raise
            failure = err
            error = one_line(err)
            if not isinstance(err, _USER_ERRORS):
                error = f"{type(err).__name__} while preparing the token store: {error}"
    error = broadcast_object(error, env)
    if error is not None:
        if failure is not None and not isinstance(failure, _USER_ERRORS):
            raise failure
        raise DataError(error) from failure
    return store if store is not None else TokenStore.open(cfg.store_dir)


def open_val_store(cfg: DataConfig, store: TokenStore, env: DistEnv) -> TokenStore:
    """The store of `data.val_source` (built, reused or rebuilt at data.val_store_dir as the
    training store is, by rank 0), with the training store's tokenizer; DataError if the
    tokenizer differs."""
    spec = store.tokenizer_spec
    tokenizer = cfg.tokenizer or (spec["path"] if spec.get("kind") == "hf" else "byte")
    val_cfg = replace(
        cfg,
        source=cfg.val_source,
        store_dir=cfg.val_store_dir or f"{cfg.store_dir.rstrip('/')}-val",
        tokenizer=tokenizer,
        limit_docs=0,
    )
    val = open_token_store(val_cfg, env)
    if tokenizer_identity(val.tokenizer_spec) != tokenizer_identity(spec):
        raise DataError(
            f"the validation store at {val_cfg.store_dir} has tokenizer "
            f"{val.tokenizer_spec.get('name')}, the training store {spec.get('name')}: point "
            "data.val_store_dir at a new directory"
        )
    return val


def rank_loader(store: TokenStore, cfg: RunConfig, dims) -> PackedLoader:
    """The loader of this rank's data-parallel share (`dims`: ParallelDims, or None for one
    process without sequence parallelism)."""
    dp_rank, dp_size = (0, 1) if dims is None else (dims.dp_rank, dims.dp)
    return build_loader(store, cfg, dp_rank, dp_size)


__all__ = ["open_token_store", "open_val_store", "rank_loader"]
