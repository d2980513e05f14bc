"""One optimizer step: shard micro-batches for sequence parallelism, forward with the tiled
loss, backward, clip, update. The loss is a sum over trained tokens divided by the global
(dp x sp) weight of trained tokens, so any layout gives the loss of one process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import parallel
from kernels.attention import VarlenMeta
from longtrain.data.batch import IGNORE_INDEX, PackedBatch
from longtrain.distributed import all_reduce_sum
from longtrain.distributed.context import StepContext
from longtrain.distributed.precision import autocast_context
from longtrain.model.flops import causal_pairs


@dataclass
class LocalBatch:
    """This rank's part of a micro-batch, ready for the model. Tensors are [T_local]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    loss_weights: torch.Tensor
    attn_meta: object
    num_padding: int  # padding added by sharding (its tokens are never trained on)


def shard_micro_batch(mb: PackedBatch, ctx: StepContext) -> LocalBatch:
    """This rank's shard of `mb` (the whole of it without sequence parallelism)."""
    dev = ctx.device
    # The model's dtype for the weights: float64 host weights (exact 1/N_i) cast once here.
    wdtype = torch.float64 if ctx.dtype == "float64" else torch.float32
    if ctx.dims is None or ctx.dims.sp_size == 1:
        meta = VarlenMeta(
            cu_seqlens_q=mb.cu_seqlens.to(dev),
            cu_seqlens_k=mb.cu_seqlens.to(dev),
            max_seqlen_q=mb.max_seqlen,
            max_seqlen_k=mb.max_seqlen,
        )
        return LocalBatch(
            tokens=mb.tokens.to(dev),
            labels=mb.labels.to(dev),
            position_ids=mb.position_ids.to(dev),
            loss_weights=mb.loss_weights.to(dev, wdtype),
            attn_meta=meta,
            num_padding=0,
        )
    if ctx.sp_policy is not None:  # short documents whole on one rank (parallel/adaptive.py)
        layout, _ = ctx.sp_policy.shard(mb.cu_seqlens, mb.num_tokens, ctx.dims.sp_rank)
    else:
        layout = parallel.shard_packed(mb.cu_seqlens, mb.num_tokens, ctx.dims, ctx.parallel_cfg)
    return LocalBatch(
        tokens=layout.take(mb.tokens, ctx.pad_id).to(dev),
        labels=layout.take(mb.labels, IGNORE_INDEX).to(dev),
        position_ids=layout.take(mb.position_ids, 0).to(dev),
        loss_weights=layout.take(mb.loss_weights, 0.0).to(dev, wdtype),
        attn_meta=layout.attn_meta,
        num_padding=int(layout.num_padding),
    )


@torch.no_grad()
def forward_token_losses(
    model: nn.Module, local: LocalBatch, ctx: StepContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy [T_local], most likely next token [T_local]) of every token of this
    rank's part of a micro-batch, without gradients: `forward_loss` with the loss head told
    to record them (`TiledLossHead.record_token_losses`, read inside the forward where a
    sharded output weight is gathered). Evaluation and the passkey test use it."""
    head = getattr(model, "module", model)  # DeepSpeed's engine wraps the model
    head.record_token_losses = True
    try:
        forward_loss(model, local, ctx)
        return head.token_losses, head.token_argmax
    finally:
        head.record_token_losses = False
        head.token_losses = head.token_argmax = None


def _no_mark(op: str) -> None:
    """The default progress mark: records nothing."""


def forward_loss(model: nn.Module, local: LocalBatch, ctx: StepContext) -> torch.Tensor:
    """The weighted sum of token losses of this rank's part of a micro-batch (a scalar), in
    the run's precision (`longtrain.distributed.precision`: bf16 parameters from the engine,
    or bf16 autocast over float32 ones). The planner runs it too."""
    with autocast_context(ctx.device, ctx.autocast):
        return model(
            local.tokens, local.position_ids, local.attn_meta, local.labels, local.loss_weights
        )


def _placements(micro_batches: list[PackedBatch], ctx: StepContext) -> list:
    """The adaptive policy's choice for each micro-batch ([] without one): the same call, on
    the same lengths (padding segments included), as `shard_micro_batch` makes (the policy
    keeps the answer)."""
    if ctx.sp_policy is None:
        return []
    return [ctx.sp_policy.choose((mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).tolist())
            for mb in micro_batches]  # fmt: skip


def _global_counts(micro_batches: list[PackedBatch], ctx: StepContext, choices) -> torch.Tensor:
    """float64 [10], summed over data-parallel ranks: trained weight, trained tokens, all
    tokens, padding tokens, documents, sequences, attended (query, key) pairs, truncated
    segments, and under adaptive placement (`choices`) the tokens of documents kept whole on
    one rank and of split ones. Counts and sums in float64: exact for any batch."""
    placed = [(c.cost.local_tokens, c.cost.split_tokens) for c in choices] or [(0, 0)] * len(
        micro_batches
    )
    counts = torch.tensor(
        [
            [
                float(mb.loss_weights.sum()),
                mb.num_trained(),
                mb.num_tokens,
                mb.num_padding,
                mb.num_docs,
                mb.num_sequences,
                causal_pairs(mb.doc_lengths()),
                mb.num_truncated,
                *placed[i],
            ]
            for i, mb in enumerate(micro_batches)
        ],
        dtype=torch.float64,
    ).sum(0)
    all_reduce_sum(counts, ctx.dp_group)  # sp ranks share their sequences: reduce over dp only
    return counts


def _forward_backward(model, micro_batches, ctx: StepContext, global_weight: float, mark):
    """Forward and backward of every micro-batch (gradients accumulate); returns this rank's
    loss sum (float64 scalar)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i, mb in enumerate(micro_batches, 1):
        mark(f"forward {i}/{len(micro_batches)}")
        local = shard_micro_batch(mb, ctx)
        mb_loss = forward_loss(model, local, ctx)
        mark(f"backward {i}/{len(micro_batches)}")
        if ctx.engine is None:
            (mb_loss / global_weight).backward()
        else:
            ctx.engine.backward(mb_loss / global_weight)
        loss_sum += mb_loss.detach().to(torch.float64)
    return loss_sum


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    micro_batches: list[PackedBatch],
    ctx: StepContext,
    mark: Callable[[str], None] = _no_mark,
) -> dict:
    """Run one optimizer step over this rank's micro-batches; returns global step metrics.

    `mark(op)` is called as each operation starts ("forward 1/4", "optimizer", ...), so that a
    failure or a hang can be reported with it (longtrain.trainer.diagnostics.StepMonitor.mark)."""
    t0 = time.perf_counter()
    mark("token counts all_reduce")
    choices = _placements(micro_batches, ctx)
    counts = _global_counts(micro_batches, ctx, choices)
    global_weight = counts[0].item()
    if global_weight <= 0:
        raise RuntimeError(
            "a step with no trained tokens (with chat data's loss mask, every token of its "
            "sequences may be context): raise train.global_batch or data.seq_len, or check "
            "the data"
        )
    loss_sum = _forward_backward(model, micro_batches, ctx, global_weight, mark)
    # The global loss first: a non-finite one must be known on every rank before any update.
    mark("loss all_reduce")
    all_reduce_sum(loss_sum, ctx.world_group)  # every rank's tokens are disjoint
    loss = loss_sum.item() / global_weight
    lr = optimizer.param_groups[0]["lr"]
    if ctx.engine is not None:
        mark("optimizer (deepspeed)")
        # ZeRO checks the gradients itself: a non-finite norm makes it skip the update.
        grad_norm = ctx.engine.step()  # reduce, clip, update and zero the gradients
        applied = ctx.engine.step_applied
        scheduler.step()
    else:
        grad_norm, applied = _update(model, optimizer, scheduler, ctx, mark, math.isfinite(loss))
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    if dist.is_initialized():
        mark("end-of-step barrier")
        dist.barrier()  # the step ends when every rank's update is done: honest step time
    step_time = time.perf_counter() - t0
    record = _record(counts, loss, lr, grad_norm, applied, step_time)
    if choices:
        record.update(_placement_metrics(counts, choices, ctx.sp_policy.n_layers))
    return record


def _placement_metrics(counts: torch.Tensor, choices: list, n_layers: int) -> dict:
    """sp_method (this rank's micro-batches' split method(s), `local` when nothing was
    split), sp_local_tokens / sp_split_tokens (all data-parallel ranks) and sp_predicted_s
    (the cost model's attention-and-communication time of this rank's micro-batches, every
    layer, forward and backward)."""
    methods = sorted({c.method.name for c in choices if c.cost.split_tokens})
    return {
        "sp_method": "+".join(methods) or "local",
        "sp_local_tokens": int(counts[8].item()),
        "sp_split_tokens": int(counts[9].item()),
        "sp_predicted_s": n_layers * sum(c.cost.seconds for c in choices),
    }


def _record(counts, loss: float, lr: float, grad_norm: float, applied: bool, step_time: float):
    """The step's metrics line (before the loop adds step, shapes, memory and FLOPs)."""
    trained = int(counts[1].item())
    real_tokens = counts[2].item() - counts[3].item()
    return {
        "loss": loss,
        "lr": lr,
        "tokens": trained,
        "tokens_per_s": trained / step_time,
        "step_time_s": step_time,
        "grad_norm": grad_norm,
        "skipped": not applied,  # the same on every rank (decided from the global loss and norm)
        "padding_frac": counts[3].item() / counts[2].item(),
        "docs_per_seq": counts[4].item() / counts[5].item(),
        "seqs": int(counts[5].item()),
        "attended_pairs": int(counts[6].item()),
        "truncated_docs": int(counts[7].item()),
        # Mean number of earlier tokens a token attends to: sum l(l-1)/2 / sum l.
        "avg_context": (counts[6].item() - real_tokens) / max(real_tokens, 1),
    }


def _update(
    model, optimizer, scheduler, ctx: StepContext, mark, loss_finite: bool
) -> tuple[float, bool]:
    """Synchronise (replicas), clip, step and zero the gradients; returns the gradient norm
    before clipping and whether the update was applied. A non-finite loss or norm skips the
    optimizer step (the weights and optimizer state stay as they were); the schedule advances
    either way, so the learning rate stays a function of the step."""
    if ctx.sync_grads_manually:
        mark("gradient all_reduce")
        for p in model.parameters():
            if p.grad is not None:
                all_reduce_sum(p.grad, ctx.world_group)
    mark("grad clip")
    clip = ctx.grad_clip or float("inf")  # 0 or None: no clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=False)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    applied = loss_finite and math.isfinite(grad_norm)
    if applied:
        mark("optimizer")
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied
