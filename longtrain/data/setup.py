"""From the data config to a loader: token store (built once, by rank 0), packing, loader."""

from __future__ import annotations

from longtrain.config import DataConfig, RunConfig
from longtrain.data.loader import PackedLoader
from longtrain.data.packing import best_fit, concat_chunk
from longtrain.data.prepare import prepare
from longtrain.data.token_store import TokenStore
from longtrain.distributed import DistEnv, barrier

PACKERS = {"concat_chunk": concat_chunk, "best_fit": best_fit}


def open_token_store(cfg: DataConfig, env: DistEnv) -> TokenStore:
    """Open the store at `cfg.store_dir`, building it from `cfg.source` first if it is missing
    or was built from other inputs (rank 0 builds; the others wait, then open)."""
    if env.is_main:
        prepare(
            cfg.source,
            cfg.store_dir,
            tokenizer=cfg.tokenizer,
            limit_docs=cfg.limit_docs or None,
            show_progress=True,
        )
    barrier(env)
    return TokenStore.open(cfg.store_dir)


def build_loader(store: TokenStore, cfg: RunConfig, dims, env: DistEnv) -> PackedLoader:
    """The packed loader of this rank's data-parallel share."""
    if cfg.data.packing not in PACKERS:
        raise ValueError(f"data.packing={cfg.data.packing!r} is not one of {sorted(PACKERS)}")
    packing = PACKERS[cfg.data.packing](store.doc_lengths, cfg.data.seq_len)
    dp_rank, dp_size = (0, 1) if dims is None else (dims.dp_rank, dims.dp)
    return PackedLoader(
        store.tokens,
        store.offsets,
        packing,
        global_batch=cfg.train.global_batch,
        micro_batch=cfg.train.micro_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        pad_id=store.pad_id,
    )
