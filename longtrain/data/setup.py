"""From the data config to a loader: token store (built once, by rank 0), schedule, loader."""

from __future__ import annotations

import math

from longtrain.config import DataConfig, RunConfig
from longtrain.data.curriculum import Stage
from longtrain.data.decomposition import decompose
from longtrain.data.loader import PackedLoader
from longtrain.data.packing import best_fit, concat_chunk
from longtrain.data.prepare import prepare
from longtrain.data.schedule import (
    DecompositionSchedule,
    FixedLengthSchedule,
    StagedSchedule,
    StageSpec,
)
from longtrain.data.token_store import TokenStore
from longtrain.distributed import DistEnv, barrier

PACKERS = {"concat_chunk": concat_chunk, "best_fit": best_fit}
PACKINGS = (*PACKERS, "decomposition")


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


def build_schedule(store: TokenStore, cfg: RunConfig):
    """The step -> sequences schedule the data config describes."""
    data, seed = cfg.data, cfg.train.seed
    if data.packing not in PACKINGS:
        raise ValueError(f"data.packing={data.packing!r} is not one of {PACKINGS}")
    tokens_per_step = cfg.train.global_batch * data.seq_len
    if data.stages:
        if data.packing == "decomposition":
            raise ValueError("data.stages needs a fixed-length packing (best_fit, concat_chunk)")
        specs = []
        for k, st in enumerate(data.stages):
            batch = st.global_batch or tokens_per_step // st.seq_len
            if batch < 1 or (not st.global_batch and tokens_per_step % st.seq_len):
                raise ValueError(
                    f"data.stages[{k}]: seq_len {st.seq_len} does not divide the "
                    f"{tokens_per_step} tokens per step; set data.stages[{k}].global_batch"
                )
            specs.append(StageSpec(Stage(st.steps, st.seq_len, st.rope_theta), batch))
        return StagedSchedule(specs, store.doc_lengths, PACKERS[data.packing], seed, data.shuffle)
    if data.packing == "decomposition":
        max_log2 = data.max_log2 or int(math.log2(data.seq_len))
        if data.max_log2 == 0 and 1 << max_log2 != data.seq_len:
            raise ValueError(
                f"packing=decomposition needs data.seq_len a power of two (got {data.seq_len}) "
                "or an explicit data.max_log2"
            )
        dec = decompose(store.doc_lengths, data.min_log2, max_log2)
        return DecompositionSchedule(
            dec, tokens_per_step, data.curriculum, data.curriculum_cycles, seed
        )
    packing = PACKERS[data.packing](store.doc_lengths, data.seq_len)
    return FixedLengthSchedule(packing, cfg.train.global_batch, seed, data.shuffle)


def build_loader(store: TokenStore, cfg: RunConfig, dims, env: DistEnv) -> PackedLoader:
    """The loader of this rank's data-parallel share."""
    dp_rank, dp_size = (0, 1) if dims is None else (dims.dp_rank, dims.dp)
    if cfg.train.global_batch % dp_size:
        raise ValueError(
            f"train.global_batch ({cfg.train.global_batch}) must be divisible by the "
            f"data-parallel size ({dp_size}); use a multiple of {dp_size}"
        )
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
    )
