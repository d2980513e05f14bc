"""Benchmark of the kernels: loss memory and attention time on CPU; Triton vs flash-attn on GPU.

    python -m bench.kernels [--tokens 16384 --vocab 32768 --dim 256 --tiles 4096 2048 1024]
                            [--attn-tokens 4096 --heads 8 --kv-heads 2 --head-dim 64]

(a) Loss memory. Forward + backward of the tiled `kernels.loss.linear_cross_entropy` (torch
    backend; at each `--tiles` value, 4096 being its default) against materialised logits +
    `F.cross_entropy` (float32, per-token weights, some ignored labels). Measured, not
    estimated: each variant runs in a fresh process that builds its inputs, warms the same
    code up at a tiny size (so one-time library allocations do not count), resets the
    kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux), and reports VmHWM
    (peak resident set) minus VmRSS at the reset: the extra memory of the step itself,
    gradients included. tracemalloc does not see torch's allocations; RSS does (large
    tensors are mmapped and returned to the system when freed).
(b) Attention time on CPU. The torch backend (`attn_varlen(backend="torch")`, per-document
    CPU flash-attention calls) against `F.scaled_dot_product_attention` with a block-diagonal
    causal mask over the same packed batch (lognormal document lengths), forward and
    forward + backward, float32. Candidates alternate within each round (the machine is
    shared) and the median counts.
(c) GPU: Triton attention against flash-attn (TFLOP/s, causal, bf16) when a GPU is present;
    otherwise the rows say that none was available.

Prints a table and writes bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
_GIB = 2**30

# ------------------------------------------------------------------------------ (a) loss memory


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def _loss_inputs(T: int, V: int, D: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(V, D, generator=gen)).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[::7] = -100  # some ignored tokens (padding, prompts)
    token_weights = torch.rand(T, generator=gen)
    return hidden, weight, labels, token_weights


def _loss_step(variant: str, inputs, tile: int) -> float:
    hidden, weight, labels, token_weights = inputs
    if variant == "materialised":
        logits_TV = hidden @ weight.t()
        ce_T = F.cross_entropy(logits_TV, labels, reduction="none", ignore_index=-100)
        loss = (ce_T * token_weights).sum()
    else:
        from kernels.loss import linear_cross_entropy

        loss = linear_cross_entropy(
            hidden, weight, labels, token_weights, -100, tile, backend="torch"
        )
    loss.backward()
    return float(loss)


def _loss_child(variant: str, T: int, V: int, D: int, tile: int) -> dict:
    """Runs in its own process: the step's peak extra memory, its time and its loss."""
    _loss_step(variant, _loss_inputs(64, 256, 16), 32)  # warm-up, tiny
    inputs = _loss_inputs(T, V, D)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = _loss_step(variant, inputs, tile)
    seconds = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM")
    return {
        "variant": variant,
        "peak_extra_bytes": (peak_kib - base_kib) * 1024,
        "seconds": seconds,
        "loss": loss,
    }


def bench_loss_memory(T: int, V: int, D: int, tiles: list[int]) -> dict:
    rows = {}
    root = Path(__file__).resolve().parents[1]
    for variant, tile in [("materialised", 0)] + [("tiled", t) for t in tiles]:
        cmd = [sys.executable, "-m", "bench.kernels", "--loss-child", variant]
        cmd += ["--tokens", str(T), "--vocab", str(V), "--dim", str(D), "--tiles", str(tile)]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        name = "materialised" if variant == "materialised" else f"tiled_{tile}"
        rows[name] = dict(row, tile_tokens=tile or None)
    mat = rows["materialised"]
    for row in rows.values():
        row["memory_ratio"] = row["peak_extra_bytes"] / mat["peak_extra_bytes"]
        row["loss_rel_diff"] = abs(row["loss"] - mat["loss"]) / abs(mat["loss"])
    return {
        "tokens": T,
        "vocab": V,
        "dim": D,
        "dtype": "float32",
        "logits_bytes": T * V * 4,
        "rows": rows,
        "memory_ratio_at_default_tile": rows.get("tiled_4096", {}).get("memory_ratio"),
        "method": "fresh process per variant; VmHWM - VmRSS after resetting the peak "
        "through /proc/self/clear_refs, once the inputs exist and after a tiny warm-up",
    }


# ---------------------------------------------------------------------------- (b) attention


def _doc_lengths(T: int, seed: int = 0) -> list[int]:
    """Lognormal document lengths (median ~400 tokens) packed into exactly T tokens."""
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < T:
        n = int(min(max(8, rng.lognormal(6.0, 1.0)), T - total))
        lengths.append(n)
        total += n
    return lengths


def _block_causal_mask(lengths: list[int]) -> torch.Tensor:
    doc_T = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(doc_T.numel())
    return (doc_T[:, None] == doc_T[None, :]) & (pos[None, :] <= pos[:, None])


def _interleaved(steps: dict, iters: int, warmup: int) -> dict[str, float]:
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_attention_cpu(T: int, H: int, K: int, D: int, iters: int) -> dict:
    from kernels.attention import attn_varlen

    lengths = _doc_lengths(T)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(T, H, D, generator=gen).requires_grad_()
    k = torch.randn(T, K, D, generator=gen).requires_grad_()
    v = torch.randn(T, K, D, generator=gen).requires_grad_()
    dout = torch.randn(T, H, D, generator=gen)
    mask_TT = _block_causal_mask(lengths)

    def ours():
        return attn_varlen(q, k, v, cu, cu, max(lengths), max(lengths), True, backend="torch")[0]

    def sdpa():
        # [T, H, D] -> [1, H, T, D]; the mask [T, T] keeps each query inside its document.
        q_1HTD, k_1KTD, v_1KTD = (x.transpose(0, 1)[None] for x in (q, k, v))
        out_1HTD = F.scaled_dot_product_attention(
            q_1HTD, k_1KTD, v_1KTD, attn_mask=mask_TT, enable_gqa=True
        )
        return out_1HTD[0].transpose(0, 1)

    def fwd(fn):
        def step():
            with torch.no_grad():
                fn()

        return step

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), dout)

    with torch.no_grad():
        max_diff = (ours() - sdpa()).abs().max().item()
    timed = _interleaved(
        {
            "torch_backend_fwd": fwd(ours),
            "sdpa_masked_fwd": fwd(sdpa),
            "torch_backend_fwd_bwd": fwd_bwd(ours),
            "sdpa_masked_fwd_bwd": fwd_bwd(sdpa),
        },
        iters=iters,
        warmup=1,
    )
    # Useful work: causal scores inside documents only (fwd 2 GEMMs; bwd 5 GEMMs -> 2.5x).
    fwd_flops = sum(4 * n * (n + 1) / 2 * D * H for n in lengths)
    return {
        "tokens": T,
        "heads": H,
        "kv_heads": K,
        "head_dim": D,
        "dtype": "float32",
        "documents": len(lengths),
        "max_doc": max(lengths),
        "threads": torch.get_num_threads(),
        "max_abs_diff_out": max_diff,
        "seconds": timed,
        "useful_gflops_fwd": fwd_flops / 1e9,
        "speedup_fwd": timed["sdpa_masked_fwd"] / timed["torch_backend_fwd"],
        "speedup_fwd_bwd": timed["sdpa_masked_fwd_bwd"] / timed["torch_backend_fwd_bwd"],
    }


# ---------------------------------------------------------------------------------- (c) GPU


def bench_attention_gpu(T: int, H: int, K: int, D: int, iters: int) -> dict:
    """Triton vs flash-attn on CUDA, bf16, causal, packed documents; TFLOP/s of useful work."""
    if not torch.cuda.is_available():
        return {"available": False, "note": "no GPU in this session: Triton vs flash-attn not run"}
    from kernels.attention import attn_varlen

    backends = ["triton"]
    try:
        import flash_attn  # noqa: F401

        backends.append("flash_attn")
    except ImportError:
        pass
    lengths = _doc_lengths(T)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).cuda()
    mk = lambda h: torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = mk(H), mk(K), mk(K)
    dout = torch.randn_like(q)
    fwd_flops = sum(4 * n * (n + 1) / 2 * D * H for n in lengths)
    rows = {}
    for be in backends:

        def run(bwd: bool, be=be):
            out = attn_varlen(q, k, v, cu, cu, max(lengths), max(lengths), True, backend=be)[0]
            if bwd:
                torch.autograd.grad(out, (q, k, v), dout)

        for name, bwd, flops in (("fwd", False, fwd_flops), ("fwd_bwd", True, 3.5 * fwd_flops)):
            for _ in range(3):
                run(bwd)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                run(bwd)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / iters
            rows[f"{be}_{name}"] = {"seconds": seconds, "tflops": flops / seconds / 1e12}
    return {"available": True, "device": torch.cuda.get_device_name(), "tokens": T, "rows": rows}


# ------------------------------------------------------------------------------------- main


def _print_tables(out: dict) -> None:
    m = out["loss_memory"]
    print(
        f"\n(a) loss forward+backward peak extra memory, T={m['tokens']} V={m['vocab']} "
        f"D={m['dim']} float32 (logits alone: {m['logits_bytes'] / _GIB:.2f} GiB)"
    )
    header = f"{'variant':<30}{'peak extra GiB':>16}{'vs materialised':>17}{'seconds':>10}"
    print(f"{header}{'loss':>15}")
    for name, r in m["rows"].items():
        label = name if name == "materialised" else f"tiled (tile_tokens={r['tile_tokens']})"
        print(
            f"{label:<30}{r['peak_extra_bytes'] / _GIB:>16.3f}{r['memory_ratio']:>17.3f}"
            f"{r['seconds']:>10.2f}{r['loss']:>15.3f}"
        )
    print("target: tiled <= 0.125 x materialised")
    a = out["attention_cpu"]
    print(
        f"\n(b) attention on CPU, T={a['tokens']} in {a['documents']} documents "
        f"(longest {a['max_doc']}), H={a['heads']} K={a['kv_heads']} D={a['head_dim']} "
        f"float32, {a['threads']} threads; max |out diff| {a['max_abs_diff_out']:.1e}"
    )
    print(f"{'':<26}{'torch backend ms':>18}{'SDPA + mask ms':>18}{'SDPA / ours':>14}")
    for step in ("fwd", "fwd_bwd"):
        ours, sdpa = a["seconds"][f"torch_backend_{step}"], a["seconds"][f"sdpa_masked_{step}"]
        print(f"{step:<26}{ours * 1e3:>18.1f}{sdpa * 1e3:>18.1f}{sdpa / ours:>14.2f}")
    g = out["attention_gpu"]
    print("\n(c) GPU attention (Triton vs flash-attn):", end=" ")
    if not g["available"]:
        print(g["note"])
        return
    print(g["device"])
    for name, r in g["rows"].items():
        print(f"{name:<26}{r['seconds'] * 1e3:>12.2f} ms{r['tflops']:>10.1f} TFLOP/s")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="loss: tokens T")
    ap.add_argument("--vocab", type=int, default=32768, help="loss: vocabulary V")
    ap.add_argument("--dim", type=int, default=256, help="loss: model dim D")
    ap.add_argument(
        "--tiles", type=int, nargs="+", default=[4096, 2048, 1024], help="loss: tile_tokens"
    )
    ap.add_argument("--attn-tokens", type=int, default=4096, help="attention: packed tokens")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5, help="attention: timed rounds (median)")
    ap.add_argument("--gpu-tokens", type=int, default=16384, help="GPU attention tokens")
    ap.add_argument("--out", default=str(RESULTS), help="JSON output path")
    ap.add_argument("--loss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loss_child:  # the measured subprocess of (a)
        row = _loss_child(args.loss_child, args.tokens, args.vocab, args.dim, args.tiles[0])
        print(json.dumps(row))
        return row
    out: dict[str, Any] = {
        "benchmark": "kernels",
        "args": vars(args),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "loss_memory": bench_loss_memory(args.tokens, args.vocab, args.dim, args.tiles),
        "attention_cpu": bench_attention_cpu(
            args.attn_tokens, args.heads, args.kv_heads, args.head_dim, args.iters
        ),
        "attention_gpu": bench_attention_gpu(
            args.gpu_tokens, 2 * args.heads, args.kv_heads, 128, args.iters
        ),
    }
    _print_tables(out)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
