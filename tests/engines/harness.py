"""Shared pieces of the engine tests: a tiny float64 run config, deterministic packed batches,
the one-process reference (`longtrain.trainer.step.train_step` on the plain model) and the same step
driven through a DeepSpeed engine. Runs in the parent and inside `tests.spawn` workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from longtrain.config import ModelConfig, RunConfig
from longtrain.data.batch import PackedBatch, build_batch
from longtrain.data.packing import best_fit
from longtrain.distributed.precision import autocast_context
from longtrain.model import build_model
from longtrain.trainer.optimizer import build_optimizer, build_scheduler
from longtrain.trainer.step import StepContext, shard_micro_batch, train_step

VOCAB = 61
PAD_ID = 0
SEQ_LEN = 32
DOC_LENGTHS = [5, 19, 8, 30, 12, 9, 40, 3, 17, 26, 11, 6]
REPO = Path(__file__).resolve().parents[2]


def run_config(**memory) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        dtype="float64",
        attn_backend="torch",
        kernel_backend="torch",
    )
    cfg.data.seq_len = SEQ_LEN
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 0
    cfg.optim.schedule = "constant"
    cfg.optim.grad_clip = 0.5  # small enough that clipping happens
    # AdamW's first update is lr * g / (|g| + eps): its sensitivity to an error in g is at most
    # lr / eps. The usual eps (1e-8) makes elements with g ~ 0 flip sign on any rounding;
    # 1e-3 bounds the amplification at 10, so gradient roundings stay visible as roundings.
    cfg.optim.eps = 1e-3
    for key, value in memory.items():
        setattr(cfg.train.memory, key, value)
    return cfg


def sequences(step: int, count: int) -> list[PackedBatch]:
    """`count` packed sequences of `SEQ_LEN` tokens for optimizer step `step`, one batch each."""
    rng = np.random.default_rng(1234)
    offsets = np.zeros(len(DOC_LENGTHS) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(DOC_LENGTHS)
    tokens = rng.integers(1, VOCAB, size=int(offsets[-1]), dtype=np.int64)
    packing = best_fit(np.asarray(DOC_LENGTHS), SEQ_LEN)
    n_seq = len(packing.seq_offsets) - 1
    ids = [(step * count + i) % n_seq for i in range(count)]
    return [build_batch(tokens, offsets, packing, np.array([b]), PAD_ID) for b in ids]


def one_process_context(cfg: RunConfig) -> StepContext:
    return StepContext(
        device=torch.device("cpu"), dtype=cfg.model.dtype, grad_clip=cfg.optim.grad_clip,
        pad_id=PAD_ID,
    )  # fmt: skip


def reference(cfg: RunConfig, steps: int, per_step: int) -> tuple[list[tuple], dict]:
    """(loss, grad norm) of `steps` steps of `per_step` sequences (micro-batches) each on one
    plain process, and the parameters after them."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    ctx = one_process_context(cfg)
    losses = []
    for step in range(steps):
        record = train_step(model, optimizer, scheduler, sequences(step, per_step), ctx)
        losses.append((record["loss"], record["grad_norm"]))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def deepspeed_step(run, scheduler, micro_batches: list[PackedBatch], ctx: StepContext) -> tuple:
    """`train_step`'s arithmetic through a DeepSpeed engine: global token weight over dp,
    loss sums over every rank, one optimizer step. Returns (loss, grad norm)."""
    from longtrain.distributed import all_reduce_sum

    local_weight = sum(float(mb.loss_weights.sum()) for mb in micro_batches)
    weight = all_reduce_sum(torch.tensor(local_weight, dtype=torch.float64), ctx.dp_group)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches:
        local = shard_micro_batch(mb, ctx)
        with autocast_context(ctx.device, ctx.autocast):
            mb_loss = run.engine(
                local.tokens, local.position_ids, local.attn_meta, local.labels, local.loss_weights
            )
        run.backward(mb_loss / weight.item())
        loss_sum += mb_loss.detach().double()
    grad_norm = run.step()
    scheduler.step()
    all_reduce_sum(loss_sum, ctx.world_group)
    return loss_sum.item() / weight.item(), grad_norm


def deepspeed_worker_setup(rank: int) -> None:
    """What torchrun would have set for DeepSpeed, and its JIT cache inside the repo."""
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))


def full_parameters(model, zero_stage: int | None = None) -> dict:
    """Every parameter in full (gathered from ZeRO-3 partitions or FSDP2 shards)."""
    if zero_stage == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out
