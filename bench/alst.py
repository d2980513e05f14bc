"""Benchmark (not a test): our Hugging Face path against DeepSpeed's ALST, side by side.

Legend: T tokens of the sequence, P processes (the Ulysses degree), V vocabulary.

One Hugging Face Llama (config.json + safetensors written once, seeded random weights,
float32) and one causal document of T tokens run forward + backward under Ulysses P = 2 and 4
on gloo, both candidates in the same processes, on the same weights and tokens:

- ours: `model=hf` as the trainer builds it: `build_hf_model`, `apply_model_stack` with
  parallel=ulysses (the attention `longtrain_varlen` swapped for our Ulysses), contiguous
  shards by `shard_micro_batch`, and `forward_loss`: the tiled linear + cross-entropy sum of
  this rank's tokens (no [T, V] logits), divided by the trained tokens of the sequence; the
  detached sum is all-reduced, as the trainer reports it.
- ALST: `UlyssesSPAttentionHF.register_with_transformers` over transformers' `sdpa`, the
  batch sharded by `UlyssesSPDataLoaderAdapter`, and the loss of the Hugging Face recipe
  (transformers' `deepspeed_sp_compute_loss`): the model's own causal-LM loss over this
  rank's materialised logits against the adapter's `shift_labels`, the per-rank means
  all-gathered (differentiably) and weighted by their token counts.

Like for like: the same T - 1 trained targets; both attend with torch's CPU flash-attention
op; no activation checkpointing, no tiled MLP; no optimizer step and no gradient reduction
over ranks (each engine's business); gradients are set to None before every call. One
document only: ALST's sdpa path drops the attention mask and attends causally over the whole
gathered sequence, so documents packed with restarting positions would attend across their
boundaries there (its flash-attention path on GPU handles them).

Timing: after warm-up, the candidates take turns within every round (A B, then B A, ...),
one intra-op thread per process. Per call: the wall seconds of the slowest rank, and the CPU
seconds summed over ranks (the work done, which the load of other jobs on a shared machine
barely moves; waiting is not counted). Reported: the median of each over rounds, and the
ratio ours/ALST as the median over rounds of the ratio within a round (the headline: wall).
With P = 4 on a 2-core machine the processes share cores: absolute times inflate, ratios at
equal P still compare like with like. The default model (E 128, 4 layers, GQA 4/2 heads,
V 4096) takes about 3 CPU seconds per forward + backward of 4,096 tokens.

Agreement, from one untimed pass of each before timing: the largest absolute difference of
the logits over all ranks (ours: the final hidden states times the output weight), of the
loss, and of the gradients summed over ranks (ALST's divided by P: every rank back-propagates
the same gathered loss, so its all-gather's backward sums P copies of each rank's gradient,
which DeepSpeed's averaging over the P ranks undoes).

    python -m bench.alst [--tokens 4096 --world-sizes 2,4] [--quick]

Prints a table and writes bench/results/alst.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from tests.spawn import spawn

RESULTS = Path(__file__).resolve().parent / "results" / "alst.json"
IGNORE = -100  # the label of a token that is not trained on (ours and transformers')
# --quick: a tiny model and sequence, a few seconds of work (tests/bench/test_alst.py runs it).
QUICK = dict(
    tokens=256,
    vocab=512,
    dim=64,
    layers=2,
    heads=4,
    kv_heads=2,
    ffn=128,
    iters=2,
    warmup=1,
)


# ------------------------------------------------------------------------------ inputs


def write_model(path: Path, args, seed: int = 0) -> Path:
    """A random-weight Hugging Face Llama of the benchmark's shape, saved to `path`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.dim,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.tokens,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return path


def sequence(args, seed: int = 0) -> torch.Tensor:
    """The one document both candidates train on: int64 [T]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab, (args.tokens,), generator=gen)


# ------------------------------------------------------------------------------ the candidates


class _Ours:
    """Our `model=hf` under parallel=ulysses, built with the trainer's own functions."""

    def __init__(self, rank: int, P: int, model_dir: Path, tokens_T: torch.Tensor):
        from longtrain.config import compose_config
        from longtrain.data.batch import PackedBatch
        from longtrain.distributed.env import DistEnv
        from longtrain.distributed.parallelize import (
            apply_model_stack,
            build_parallel_dims,
            step_context,
        )
        from longtrain.model.hf import build_hf_model
        from longtrain.trainer.step import shard_micro_batch

        T = tokens_T.numel()
        cfg = compose_config(
            ["model=hf", f"model.path={model_dir}", "model.dtype=float32",
             "model.attn_backend=torch", "model.kernel_backend=torch",
             "parallel=ulysses", f"parallel.ulysses={P}", f"data.seq_len={T}"]
        )  # fmt: skip
        env = DistEnv(rank=rank, world_size=P, local_rank=rank, device=torch.device("cpu"))
        self.model = build_hf_model(cfg.model, seed=cfg.train.seed).train()
        dims = build_parallel_dims(cfg, env)
        apply_model_stack(self.model, dims, cfg)  # the trainer's steps 0-2: SP, memory stack
        self.ctx = step_context(cfg, env, dims, pad_id=0)
        labels_T = torch.cat([tokens_T[1:], torch.tensor([IGNORE])])  # the next token
        mb = PackedBatch(
            tokens=tokens_T,
            labels=labels_T,
            position_ids=torch.arange(T),
            cu_seqlens=torch.tensor([0, T], dtype=torch.int32),
            loss_weights=(labels_T != IGNORE).to(torch.float64),
            segment_is_padding=torch.tensor([False]),
            num_sequences=1,
            num_docs=1,
            num_padding=0,
        )
        self.global_weight = float(mb.loss_weights.sum())  # known before the step (every rank)
        self.local = shard_micro_batch(mb, self.ctx)

    def step(self) -> torch.Tensor:
        """Forward + backward; returns the sequence's mean loss (detached)."""
        from longtrain.trainer.step import forward_loss

        self.model.zero_grad(set_to_none=True)
        loss_sum = forward_loss(self.model, self.local, self.ctx)
        (loss_sum / self.global_weight).backward()
        total = loss_sum.detach().to(torch.float64)
        dist.all_reduce(total)  # the step's loss on every rank, as train_step reports it
        return total / self.global_weight

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        local = self.local
        hidden_TE = self.model(local.tokens, local.position_ids, local.attn_meta)
        return self.model.logits(hidden_TE)  # [T/P, V]

    def grads(self) -> dict[str, torch.Tensor]:
        """Gradients by transformers' parameter name (ours sit under the prefix `hf.`)."""
        return {n.removeprefix("hf."): p.grad for n, p in self.model.named_parameters()}


class _ALST:
    """DeepSpeed's Ulysses for Hugging Face models, as its recipe runs it."""

    def __init__(self, rank: int, P: int, model_dir: Path, tokens_T: torch.Tensor):
        import deepspeed
        from deepspeed.runtime.sequence_parallel.ulysses_sp import (
            UlyssesSPAttentionHF,
            UlyssesSPDataLoaderAdapter,
        )
        from torch.utils.data import DataLoader
        from transformers import AutoModelForCausalLM

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # the group exists
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
        ).train()  # from_pretrained returns eval mode
        # Replaces transformers' `sdpa` entry in this process by its Ulysses wrapper.
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=self.model,
            core_attn_implementation="sdpa",
            sequence_parallel_size=P,
            micro_batch_size=1,
        )
        self.group = mpu.get_sequence_parallel_group()
        T = tokens_T.numel()
        sample = {"input_ids": tokens_T, "position_ids": torch.arange(T), "labels": tokens_T}
        loader = DataLoader([sample], batch_size=1)  # -> [1, T] tensors
        adapter = UlyssesSPDataLoaderAdapter(
            loader,
            sp_rank=mpu.get_sequence_parallel_rank(),
            sp_group=self.group,
            sp_world_size=P,
            device=torch.device("cpu"),
        )
        self.batch = next(iter(adapter))  # this rank's shard, labels shifted as shift_labels

    def step(self) -> torch.Tensor:
        """Forward + backward; returns the sequence's mean loss (detached)."""
        import torch.distributed.nn.functional as dist_fn

        self.model.zero_grad(set_to_none=True)
        b = self.batch
        shift_labels = b["shift_labels"]
        out = self.model(
            input_ids=b["input_ids"],
            position_ids=b["position_ids"],
            labels=shift_labels,  # the recipe passes both; shift_labels means "already shifted"
            shift_labels=shift_labels,
        )
        # The recipe's weighting: each rank's mean loss times its trained tokens, over all.
        losses_P = torch.stack(dist_fn.all_gather(out.loss, group=self.group))
        count = (shift_labels != IGNORE).sum().to(out.loss.dtype)
        counts_P = torch.stack(dist_fn.all_gather(count, group=self.group))
        loss = (losses_P * counts_P).sum() / counts_P.sum()
        loss.backward()
        return loss.detach().to(torch.float64)

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        b = self.batch
        return self.model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self.model.named_parameters()}


# ------------------------------------------------------------------------------ one world size


def _timed(steps: dict, iters: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Per round, each step function's wall seconds (of the slowest rank) and CPU seconds
    (summed over ranks; `time.process_time`: this process's threads, gloo's included, not
    time spent waiting or descheduled). On a shared machine the wall time carries the load of
    other jobs; the CPU time is the work each candidate did. The candidates take turns within
    every round, in reversed order every other round (A B B A ...), so neither always goes
    first and a drifting load hits both alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: {"wall": [], "cpu": []} for name in steps}
    order = list(steps)
    for i in range(iters):
        for name in order if i % 2 == 0 else order[::-1]:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu)
            times[name]["wall"].append(float(wall))
            times[name]["cpu"].append(float(cpu))
    return times


def _summary(times: dict[str, dict[str, list[float]]]) -> dict:
    """Medians per candidate, and the ratios ours/ALST: the median over rounds of the ratio
    within a round (the two calls of a round are seconds apart, so load changes cancel)."""
    ours, alst = times["ours"], times["alst"]
    out = {}
    for kind, suffix in (("wall", "s"), ("cpu", "cpu_s")):
        out[f"ours_{suffix}"] = statistics.median(ours[kind])
        out[f"alst_{suffix}"] = statistics.median(alst[kind])
        ratios = [a / b for a, b in zip(ours[kind], alst[kind])]
        prefix = "ratio" if kind == "wall" else "cpu_ratio"
        out[f"{prefix}_ours_over_alst"] = statistics.median(ratios)
    out["rounds"] = times
    return out


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _agreement(ours: _Ours, alst: _ALST, P: int) -> dict:
    """Largest differences of logits, loss and rank-summed gradients (one untimed pass)."""
    logits_ours = ours.logits()
    logits_diff = (logits_ours - alst.logits()).abs().max().item()
    loss_ours, loss_alst = ours.step(), alst.step()
    g_ours, g_alst = ours.grads(), alst.grads()
    if set(g_ours) != set(g_alst):
        raise RuntimeError(f"parameters differ: {sorted(set(g_ours) ^ set(g_alst))[:4]}")
    grad_diff = grad_max = 0.0
    for name in sorted(g_ours):
        a, b = g_ours[name].clone(), g_alst[name].clone()
        dist.all_reduce(a)
        dist.all_reduce(b)
        b /= P  # see the module docstring: ALST's gradients carry the factor P
        grad_diff = max(grad_diff, (a - b).abs().max().item())
        grad_max = max(grad_max, a.abs().max().item())
    return {
        "logits_max_abs_diff": _max_over_ranks(logits_diff),
        "logits_max_abs": _max_over_ranks(logits_ours.abs().max().item()),
        "loss_ours": float(loss_ours),
        "loss_alst": float(loss_alst),
        "loss_abs_diff": abs(float(loss_ours - loss_alst)),
        "grad_max_abs_diff": grad_diff,
        "grad_max_abs": grad_max,
    }


def _worker(rank: int, P: int, args, model_dir: Path) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model and rank
    # The recipe's differentiable all-gather is deprecated in torch; it is theirs to change.
    warnings.filterwarnings(
        "ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning
    )
    tokens_T = sequence(args)
    ours = _Ours(rank, P, model_dir, tokens_T)
    alst = _ALST(rank, P, model_dir, tokens_T)
    if not torch.equal(ours.local.tokens, alst.batch["input_ids"][0]):
        raise RuntimeError(f"rank {rank}: the two candidates hold different tokens")
    info = _agreement(ours, alst, P)
    times = _timed({"ours": ours.step, "alst": alst.step}, args.iters, args.warmup)
    return {**info, **_summary(times)}


# ------------------------------------------------------------------------------ report


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print(rows: list[dict], shape: str) -> None:
    print(f"\nHF Llama forward + backward, ours (model=hf) vs DeepSpeed ALST, {shape}")
    head = (
        f"{'P':>2} {'ours s':>7} {'ALST s':>7} {'ours/ALST':>9} {'CPU s ours':>10} "
        f"{'CPU s ALST':>10} {'CPU ratio':>9} {'logits diff':>11} {'loss diff':>9} "
        f"{'grad diff':>9} {'max grad':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['P']:>2} {r['ours_s']:7.3f} {r['alst_s']:7.3f} {r['ratio_ours_over_alst']:9.2f} "
            f"{r['ours_cpu_s']:10.3f} {r['alst_cpu_s']:10.3f} "
            f"{r['cpu_ratio_ours_over_alst']:9.2f} {r['logits_max_abs_diff']:11.1e} "
            f"{r['loss_abs_diff']:9.1e} {r['grad_max_abs_diff']:9.1e} {r['grad_max_abs']:9.1e}"
        )
    print(
        "s: median wall seconds of the slowest rank; CPU s: median CPU seconds summed over "
        "ranks; ratios: median over rounds of ours/ALST within a round; diffs: largest "
        "absolute (logits over all ranks; gradients summed over ranks)"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=352)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--quick", action="store_true", help="a tiny model and sequence (smoke)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for name in ("transformers", "deepspeed"):  # `make bench` reports a missing one as skipped
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"bench.alst needs {name}", name=name)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_alst_") as tmp:
        model_dir = write_model(Path(tmp) / "llama", args)
        for P in [int(x) for x in args.world_sizes.split(",")]:
            res = spawn(_worker, P, args, model_dir, timeout=1800)[0]  # rank 0's view
            rows.append({"P": P, **res})
    shape = (
        f"T={args.tokens} (one causal document), Llama E={args.dim} L={args.layers} "
        f"Hq={args.heads} K={args.kv_heads} F={args.ffn} V={args.vocab}, float32, CPU/gloo, "
        "1 thread per process"
    )
    _print(rows, shape)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "shape": shape,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
