"""Benchmark (not a test): sequence-parallel attention forward + backward on CPU / gloo.

Legend: T tokens of the sequence, P processes, Hq / Hkv heads, D head dim.

For P = 2 and 4 processes and the same shapes (one causal document of T tokens, float32):
- our Ulysses vs DeepSpeed's Ulysses (`deepspeed.sequence.layer.DistributedAttention`
  around a local `scaled_dot_product_attention`): both run the same CPU flash-attention
  kernel on the gathered sequence, so the difference is the communication and layout code;
- our ring (zigzag P2P, and all-gather) and USP vs PyTorch's context parallel attention
  (`torch.distributed.tensor.experimental.context_parallel`), if it runs on CPU;
- bytes moved: ours measured by CommStats against the analytic formula; DeepSpeed's from
  its documented all-to-all pattern (q, k, v and out, each (P-1)/P of the local tensor).

Timing: median over iterations of the slowest rank's forward + backward, after warm-up,
one intra-op thread per process. With 4 processes on a 2-core machine the processes share
cores, so absolute times are inflated; ratios at equal P compare like with like.

    python -m bench.sp_attention [--tokens 4096 --heads 8 --kv-heads 8 --head-dim 64]

Prints a table and writes bench/results/sp_attention.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel import CommStats, ParallelDims, shard_packed, usp_attn_varlen_func, usp_cost
from tests.spawn import spawn

RESULTS = Path(__file__).parent / "results" / "sp_attention.json"


class Cfg:
    def __init__(self, method: str, ulysses: int = 1, ring: int = 1, ring_impl: str = "zigzag"):
        self.method, self.ulysses, self.ring, self.ring_impl = method, ulysses, ring, ring_impl


def _timed_interleaved(steps: dict, iters: int, warmup: int) -> dict[str, float]:
    """Median seconds of the slowest rank per call of each step function. Candidates take
    turns within every round, so background load on a shared machine hits them alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name].append(float(t))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _full_inputs(T: int, hq: int, hkv: int, d: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv, hq)]  # q, k, v, dout


def _ours(P: int, cfg: Cfg, args):
    """(step function, info): one of our methods; info has measured and formula bytes."""
    T, hq, hkv, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    dims = ParallelDims(P, ulysses=cfg.ulysses, ring=cfg.ring)
    dims.validate(hq, hkv, T)
    dims.build_mesh("cpu")
    layout = shard_packed(torch.tensor([0, T]), T, dims, cfg)
    q, k, v, dout = (layout.take(x, 0.0) for x in _full_inputs(T, hq, hkv, d))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step(stats=None):
        out, _ = usp_attn_varlen_func(
            dims.ulysses_group, dims.ring_group, q, k, v, layout.attn_meta, True, None,
            "torch", cfg.ring_impl, stats,
        )  # fmt: skip
        out.backward(dout)

    stats = CommStats()
    step(stats)  # one counted call: the bytes of exactly one forward + backward
    cost = usp_cost(layout.attn_meta.layout.local_tokens, hq, hkv, d, dims.ulysses, dims.ring,
                    torch.float32, cfg.ring_impl)  # fmt: skip
    return step, {"bytes": stats.bytes_sent, "formula_bytes": cost.fwd_bytes + cost.bwd_bytes}


class _LocalSDPA(nn.Module):
    """DeepSpeed's local attention: SDPA on (S, B, H, D) tensors."""

    def forward(self, q_SBHD, k_SBKD, v_SBKD, *args, **kwargs):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q_SBHD, k_SBKD, v_SBKD))  # -> (B, H, S, D)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.permute(2, 0, 1, 3)  # (B, H, S, D) -> (S, B, H, D)


def _deepspeed(P: int, args):
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    T, hq, hkv, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    group = dist.new_group(list(range(P)))
    attn = DistributedAttention(_LocalSDPA(), group, scatter_idx=2, gather_idx=0)
    rank, n = dist.get_rank(), T // P
    # (T, H, D) -> this rank's contiguous (T/P, 1, H, D) slice, DeepSpeed's (S, B, H, D).
    q, k, v, dout = (x[rank * n : (rank + 1) * n, None] for x in _full_inputs(T, hq, hkv, d))
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))

    def step():
        out = attn(q, k, v, 1)
        out.backward(dout)

    step()  # fails here (and is reported) when DeepSpeed refuses the shapes
    # Its documented pattern: q, k, v and out each all-to-all'd once forward and once
    # backward, (P-1)/P of the local tensor leaving the rank (analytic, not measured).
    a2a = lambda h: (P - 1) * n * (h // P) * d * 4  # noqa: E731  float32, one tensor
    return step, {"bytes": 2 * (2 * a2a(hq) + 2 * a2a(hkv))}


def _torch_cp(P: int, args):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    T, hq, hkv, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    mesh = init_device_mesh("cpu", (P,))
    # (T, H, D) -> (1, H, T, D); context_parallel shards these buffers in place (no grad).
    bufs = [x.permute(1, 0, 2)[None].contiguous() for x in _full_inputs(T, hq, hkv, d)[:3]]

    def step():
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2]):
            q, k, v = (x.detach().requires_grad_() for x in bufs)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)
            out.sum().backward()

    step()
    return step, {}


def _worker(rank: int, world_size: int, args) -> dict:
    P = world_size
    builders = {
        "ulysses": lambda: _ours(P, Cfg("ulysses", ulysses=P), args),
        "ring-zigzag": lambda: _ours(P, Cfg("ring", ring=P), args),
        "ring-allgather": lambda: _ours(P, Cfg("ring", ring=P, ring_impl="allgather"), args),
        "deepspeed-ulysses": lambda: _deepspeed(P, args),
        "torch-cp": lambda: _torch_cp(P, args),
    }
    if P == 4:
        builders["usp-2x2"] = lambda: _ours(P, Cfg("usp", ulysses=2, ring=2), args)
    steps, info = {}, {}
    for name, build in builders.items():
        try:
            steps[name], info[name] = build()
        except Exception as e:  # a peer that does not run here: say why, do not hide it
            info[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    for name, seconds in _timed_interleaved(steps, args.iters, args.warmup).items():
        info[name]["seconds"] = seconds
    return info


def _rows(P: int, res: dict) -> list[dict]:
    pairs = [
        ("ulysses", "deepspeed-ulysses"),
        ("ring-zigzag", "torch-cp"),
        ("ring-allgather", "torch-cp"),
        ("usp-2x2", "torch-cp"),
    ]
    rows = []
    for ours, peer in pairs:
        if ours not in res:
            continue
        o, p = res[ours], res[peer]
        rows.append(
            {
                "P": P,
                "method": ours,
                "ms": 1e3 * o["seconds"],
                "bytes": o["bytes"],
                "formula_bytes": o["formula_bytes"],
                "peer": peer,
                "peer_ms": 1e3 * p["seconds"] if "seconds" in p else None,
                "peer_bytes": p.get("bytes"),
                "ratio_ours_over_peer": o["seconds"] / p["seconds"] if "seconds" in p else None,
                "peer_note": p.get("error", ""),
            }
        )
    return rows


def _print(rows: list[dict], shape: str) -> None:
    print(f"\nSP attention forward + backward, {shape}")
    head = (
        f"{'P':>2} {'ours':<15} {'ms':>8} {'bytes':>11} {'formula':>11} {'peer':<18} "
        f"{'peer ms':>8} {'peer bytes':>11} {'ours/peer':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        peer_ms = f"{r['peer_ms']:8.1f}" if r["peer_ms"] is not None else f"{'-':>8}"
        peer_bytes = f"{r['peer_bytes']:>11}" if r["peer_bytes"] else f"{'-':>11}"
        ratio = f"{r['ratio_ours_over_peer']:9.2f}" if r["ratio_ours_over_peer"] else f"{'-':>9}"
        print(
            f"{r['P']:>2} {r['method']:<15} {r['ms']:8.1f} {r['bytes']:>11} "
            f"{r['formula_bytes']:>11} {r['peer']:<18} {peer_ms} {peer_bytes} {ratio}"
        )
    notes = {(r["P"], r["peer"]): r["peer_note"] for r in rows if r["peer_note"]}
    for (P, peer), note in notes.items():
        print(f"  P={P} {peer}: did not run here: {note}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--world-sizes", default="2,4")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    for P in [int(x) for x in args.world_sizes.split(",")]:
        res = spawn(_worker, P, args, timeout=1800)[0]
        rows += _rows(P, res)
    shape = (
        f"T={args.tokens} (one causal document), Hq={args.heads}, Hkv={args.kv_heads}, "
        f"D={args.head_dim}, float32, CPU/gloo, 1 thread per process"
    )
    _print(rows, shape)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shape": shape, "torch": torch.__version__, "machine": platform.machine()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
