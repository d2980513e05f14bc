"""The attention section: packed documents, the FLOP count, the float64 reference, and
fwd / fwd+bwd timings and errors of each backend."""

from __future__ import annotations

import contextlib
import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.gpu_check.common import GIB, Deadline, error_text, max_abs_err, say, sync

# The embedded corpus' document lengths (ENVIRONMENT.md: median 6,843, p99 163,266 tokens),
# fitted as a lognormal: sigma = ln(163266 / 6843) / 2.326 (the 99th percentile's z).
DOC_MEDIAN, DOC_SIGMA = 6843.0, 1.364
REF_CHUNK_BYTES = GIB  # the float64 reference's score matrix per row chunk stays under this
# SDPA with a boolean mask: torch turns it into a [T, T] additive bias of q's dtype (2 bytes
# in bf16) beside the bool itself, 3 T^2 bytes in all; beyond this the dense baseline is skipped.
SDPA_MAX_MASK_BYTES = 4 * GIB
FWD_BWD_FACTOR = 3.5  # flash-attn's benchmark convention: backward = 2.5 x forward (5 GEMMs to 2)


# ------------------------------------------------------------------------ packed documents


def doc_lengths(T: int, seed: int = 0, median: float = DOC_MEDIAN) -> list[int]:
    """Seeded heavy-tailed document lengths summing to exactly T (the last one truncated).

    Lognormal with the embedded corpus' median and spread (DOC_MEDIAN, DOC_SIGMA); each at
    least 1 token. Returns a list of N ints.
    """
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    total = 0
    while total < T:
        drawn = max(1, int(rng.lognormal(math.log(median), DOC_SIGMA)))
        lengths.append(min(drawn, T - total))
        total += lengths[-1]
    return lengths


def attention_flops(lengths: list[int], Hq: int, D: int) -> float:
    """Forward FLOPs of causal attention over packed documents, counting useful work only.

    Exactly: sum over documents of L (L + 1) / 2 attended (query, key) pairs, times Hq heads,
    times 4 D (2 D for the q.k dot product, 2 D for adding p.v into the output). Softmax and
    masking are not counted, nor the scores a dense kernel computes and masks away.
    fwd+bwd is FWD_BWD_FACTOR (3.5) times this: the backward's 5 GEMMs against the forward's
    2, recomputation not counted (flash-attn's benchmarks).
    """
    return 4.0 * D * Hq * sum(L * (L + 1) // 2 for L in lengths)


@dataclass
class Packed:
    """One packed batch: q [T, Hq, D], k / v [T, K, D] (leaves requiring grad), dout [T, Hq, D],
    cu [N + 1] int32 document boundaries on the same device, lengths (N ints)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    cu: torch.Tensor
    lengths: list[int]
    mask_TT: torch.Tensor | None = None  # built on first use (SDPA only), then kept

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def block_causal_mask(self) -> torch.Tensor:
        """[T, T] bool: query i sees key j when both are in one document and j <= i."""
        if self.mask_TT is None:
            self.mask_TT = self._build_mask()
        return self.mask_TT

    def _build_mask(self) -> torch.Tensor:
        lengths = torch.tensor(self.lengths, device=self.q.device)
        doc_T = torch.repeat_interleave(
            torch.arange(len(self.lengths), device=self.q.device), lengths
        )
        pos_T = torch.arange(doc_T.numel(), device=self.q.device)
        return (doc_T[:, None] == doc_T[None, :]) & (pos_T[None, :] <= pos_T[:, None])


def make_packed(
    T: int,
    Hq: int,
    K: int,
    D: int,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    median: float = DOC_MEDIAN,
) -> Packed:
    """Seeded standard-normal q, k, v, dout of `dtype` on `device` over `doc_lengths(T)`."""
    lengths = doc_lengths(T, seed, median)
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(heads: int) -> torch.Tensor:
        return torch.randn(T, heads, D, device=device, generator=gen).to(dtype)

    q, k, v, dout = draw(Hq), draw(K), draw(K), draw(Hq)
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    return Packed(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout, cu, lengths)


# ------------------------------------------------------------------ float64 reference


def reference_attention(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    dout_THD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    chunk_bytes: int = REF_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """Causal packed self-attention and its gradients in float64, on the inputs' device.

    Args: q_THD / dout_THD [T, Hq, D], k_TKD / v_TKD [T, K, D] (any float dtype; upcast),
    cu_seqlens [N + 1]; softmax_scale defaults to 1 / sqrt(D). Each document runs in chunks of
    query rows against the keys up to the chunk's last row, as many rows as keep one chunk's
    [Hq, rows, keys] float64 scores within `chunk_bytes`: a chunk holds its rows' whole
    softmax, so forward and backward (dq of the rows, their share of dk / dv) finish in it.
    Returns float64 {"out" [T, Hq, D], "lse" [Hq, T], "dq" [T, Hq, D], "dk", "dv" [T, K, D]}.
    """
    q, k, v, do = (x.detach().to(torch.float64) for x in (q_THD, k_TKD, v_TKD, dout_THD))
    T, Hq, D = q.shape
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    res = {
        "out": torch.empty_like(q),
        "lse": q.new_empty(Hq, T),
        "dq": torch.empty_like(q),
        "dk": torch.zeros_like(k),
        "dv": torch.zeros_like(v),
    }
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        rows = max(1, chunk_bytes // (8 * Hq * max(1, e - s)))
        for r0 in range(0, e - s, rows):
            _reference_chunk(q, k, v, do, s, r0, min(e - s, r0 + rows), scale, res)
    return res


def _reference_chunk(q, k, v, do, s: int, r0: int, r1: int, scale: float, res: dict) -> None:
    """Rows [r0, r1) of the document starting at token s, against its keys [0, r1)."""
    c, K, D = r1 - r0, k.shape[1], k.shape[2]
    G = q.shape[1] // K
    # (c, Hq, D) -> (c, K, G, D): query head h reads KV head h // G.
    q_cKGD = q[s + r0 : s + r1].view(c, K, G, D)
    do_cKGD = do[s + r0 : s + r1].view(c, K, G, D)
    k_jKD, v_jKD = k[s : s + r1], v[s : s + r1]
    s_KGcj = torch.einsum("ckgd,jkd->kgcj", q_cKGD, k_jKD) * scale
    i_c1 = torch.arange(r0, r1, device=q.device)[:, None]
    s_KGcj.masked_fill_(torch.arange(r1, device=q.device)[None, :] > i_c1, float("-inf"))
    lse_KGc = torch.logsumexp(s_KGcj, dim=-1)
    p_KGcj = s_KGcj.sub_(lse_KGc[..., None]).exp_()  # the scores' memory, reused
    out_cKGD = torch.einsum("kgcj,jkd->ckgd", p_KGcj, v_jKD)
    delta_KGc = torch.einsum("ckgd,ckgd->kgc", do_cKGD, out_cKGD)
    ds_KGcj = torch.einsum("ckgd,jkd->kgcj", do_cKGD, v_jKD).sub_(delta_KGc[..., None])
    ds_KGcj.mul_(p_KGcj)
    res["out"][s + r0 : s + r1] = out_cKGD.reshape(c, K * G, D)
    res["lse"][:, s + r0 : s + r1] = lse_KGc.reshape(K * G, c)
    res["dq"][s + r0 : s + r1] = (
        torch.einsum("kgcj,jkd->ckgd", ds_KGcj, k_jKD).reshape(c, K * G, D).mul_(scale)
    )
    res["dk"][s : s + r1] += torch.einsum("kgcj,ckgd->jkd", ds_KGcj, q_cKGD).mul_(scale)
    res["dv"][s : s + r1] += torch.einsum("kgcj,ckgd->jkd", p_KGcj, do_cKGD)


# --------------------------------------------------------------------------- attention

Runner = Callable[[Packed], tuple[torch.Tensor, torch.Tensor | None]]


def varlen_runner(backend: str) -> Runner:
    """`kernels.attention.attn_varlen` with `backend`: (out [T, Hq, D], lse [Hq, T])."""

    def run(p: Packed):
        from kernels.attention import attn_varlen

        return attn_varlen(p.q, p.k, p.v, p.cu, p.cu, p.max_len, p.max_len, True, backend=backend)

    return run


def sdpa_masked(p: Packed) -> tuple[torch.Tensor, None]:
    """`F.scaled_dot_product_attention` over the whole batch with a block-diagonal causal mask
    (KV heads repeated to Hq: the memory-efficient kernel, the one that takes a mask, has no
    GQA). Computes every one of the T^2 scores; returns (out [T, Hq, D], None)."""
    G = p.q.shape[1] // p.k.shape[1]
    # [T, H, D] -> [1, H, T, D]
    q, k, v = (
        x.transpose(0, 1)[None]
        for x in (p.q, p.k.repeat_interleave(G, 1), p.v.repeat_interleave(G, 1))
    )
    context = contextlib.nullcontext()
    if p.q.is_cuda:  # never fall back to the math kernel: it would hold [Hq, T, T] scores
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
    with context:
        out_1HTD = F.scaled_dot_product_attention(q, k, v, attn_mask=p.block_causal_mask())
    return out_1HTD[0].transpose(0, 1), None


def attention_backends(device: str) -> dict[str, Runner]:
    """The backends to benchmark on `device`, name -> runner (unavailable ones are skipped
    with a reason by `why_not`)."""
    names = ["triton", "torch_varlen", "flash_attn"] if device == "cuda" else ["torch"]
    return {**{n: varlen_runner(n) for n in names}, "sdpa_masked": sdpa_masked}


def why_not(backend: str, device: str, T: int) -> str | None:
    """Why `backend` cannot run at T tokens on `device`, or None when it can."""
    if backend in ("triton", "torch_varlen", "flash_attn") and device != "cuda":
        return "needs CUDA"
    if backend in ("triton", "torch_varlen", "flash_attn"):
        from kernels.attention import BACKENDS

        if backend not in BACKENDS:
            return f"this checkout's kernels.attention has no {backend!r} backend"
    if backend == "flash_attn":
        try:
            importlib.import_module("flash_attn")
        except Exception as err:  # ImportError, or a broken build failing at import
            return f"flash_attn does not import: {error_text(err)}"
    if backend == "sdpa_masked" and 3 * T * T > SDPA_MAX_MASK_BYTES:
        return (
            f"dense [T, T] mask and bias would take {3 * T * T / GIB:.0f} GiB "
            f"(limit {SDPA_MAX_MASK_BYTES / GIB:.0f} GiB)"
        )
    return None


def time_call(fn: Callable[[], object], device: str, max_iters: int = 10) -> tuple[float, float]:
    """(median seconds of `fn()`, seconds spent in the timed calls) after one warm-up call,
    which also sizes the count: about 0.3 s of calls, at least 3, at most `max_iters`."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(max(3, min(max_iters, int(0.3 / max(warm, 1e-6))))):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(times)


def bench_backend(run: Runner, p: Packed, device: str, ref: dict | None) -> tuple[dict, float]:
    """Times fwd and fwd+bwd of one backend on `p`; errors of its results against `ref`.

    Returns ({"fwd_s", "fwd_bwd_s", "err_out", "err_lse", "err_dq", "err_dk", "err_dv"},
    seconds spent apart from the warm-up calls, where compiling and autotuning happen).
    Errors are None without a reference; err_lse None for a backend without lse."""
    leaves = (p.q, p.k, p.v)

    def fwd():
        with torch.no_grad():
            run(p)

    def fwd_bwd():
        torch.autograd.grad(run(p)[0], leaves, p.dout)

    (fwd_s, spent_fwd), (fwd_bwd_s, spent_fwd_bwd) = (
        time_call(fwd, device),
        time_call(fwd_bwd, device),
    )
    row = {"fwd_s": fwd_s, "fwd_bwd_s": fwd_bwd_s}
    spent = spent_fwd + spent_fwd_bwd
    if ref is None:
        return row, spent
    t0 = time.perf_counter()
    out, lse = run(p)
    grads = torch.autograd.grad(out, leaves, p.dout)
    row["err_out"] = max_abs_err(out, ref["out"])
    row["err_lse"] = None if lse is None else max_abs_err(lse, ref["lse"])
    for name, g in zip(("dq", "dk", "dv"), grads):
        row[f"err_{name}"] = max_abs_err(g, ref[name])
    return row, spent + time.perf_counter() - t0


def _attention_row(T: int, p_or_lengths, backend: str, status: str, note: str = "") -> dict:
    lengths = p_or_lengths.lengths if isinstance(p_or_lengths, Packed) else p_or_lengths
    return {
        "tokens": T,
        "documents": len(lengths),
        "longest": max(lengths),
        "backend": backend,
        "status": status,
        "note": note,
    }


def bench_attention_size(
    T: int,
    shape: tuple[int, int, int],
    device: str,
    dtype: torch.dtype,
    backends: dict[str, Runner],
    deadline: Deadline,
    median: float = DOC_MEDIAN,
    chunk_bytes: int = REF_CHUNK_BYTES,
) -> tuple[list[dict], float]:
    """One row per backend at T tokens: ms, TFLOP/s (attention_flops) and errors against the
    float64 reference (`reference_attention`, computed once for all backends). Also returns
    the seconds this size took apart from warm-up calls (compiles and autotuning happen
    there): the cost a larger size scales from."""
    Hq, K, D = shape
    p = make_packed(T, Hq, K, D, device, dtype, median=median)
    flops = attention_flops(p.lengths, Hq, D)
    ref, ref_note = None, ""
    t0 = time.perf_counter()
    try:
        ref = reference_attention(p.q, p.k, p.v, p.dout, p.cu, chunk_bytes=chunk_bytes)
    except Exception as err:  # timings still mean something without it
        ref_note = f"reference failed: {error_text(err)}"
    steady_s = time.perf_counter() - t0
    rows = []
    for name, run in backends.items():
        reason = why_not(name, device, T)
        if reason is None and deadline.left() <= 0:
            reason = "section budget spent"
        if reason is not None:
            rows.append(_attention_row(T, p, name, "skipped", reason))
            continue
        row = _attention_row(T, p, name, "ok", ref_note)
        try:
            measured, spent = bench_backend(run, p, device, ref)
            row.update(measured)
            steady_s += spent
        except Exception as err:  # one backend failing must not hide the others
            row.update(status="error", note=error_text(err))
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        if "fwd_s" in row:
            row["fwd_ms"], row["fwd_bwd_ms"] = 1e3 * row["fwd_s"], 1e3 * row["fwd_bwd_s"]
            row["fwd_tflops"] = flops / row["fwd_s"] / 1e12
            row["fwd_bwd_tflops"] = FWD_BWD_FACTOR * flops / row["fwd_bwd_s"] / 1e12
        errs = [row.get(f"err_{n}") for n in ("out", "lse", "dq", "dk", "dv")]
        if any(e is not None and not math.isfinite(e) for e in errs):
            row.update(status="fail", note="non-finite error against the float64 reference")
        say(
            f"attention T={T} {name}: {row['status']} "
            f"{row.get('fwd_bwd_tflops', 0):.1f} TFLOP/s fwd+bwd {row['note']}"
        )
        rows.append(row)
    return rows, steady_s


def attention_goal(
    rows: list[dict],
    tokens: int,
    ours: str = "triton",
    theirs: str = "torch_varlen",
    target: float = 0.8,
) -> dict:
    """The issue's goal: ours / theirs fwd+bwd TFLOP/s at `tokens` >= target."""
    name = f"{ours} / {theirs} fwd+bwd TFLOP/s at T={tokens}"
    got = {r["backend"]: r.get("fwd_bwd_tflops") for r in rows if r["tokens"] == tokens}
    if got.get(ours) is None or got.get(theirs) is None:
        return {
            "name": name,
            "target": f">= {target}",
            "value": None,
            "status": "skipped",
            "note": f"needs both {ours} and {theirs} measured at T={tokens}",
        }
    ratio = got[ours] / got[theirs]
    return {
        "name": name,
        "target": f">= {target}",
        "value": ratio,
        "status": "pass" if ratio >= target else "fail",
        "note": "",
    }


def section_attention(
    device: str,
    sizes: list[int],
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    deadline: Deadline,
    median: float = DOC_MEDIAN,
    goal_tokens: int = 32768,
    backends: dict[str, Runner] | None = None,
) -> dict:
    """Attention rows for every size. A size whose estimated time exceeds what the budget has
    left is skipped with that reason: the previous size's steady time (`bench_attention_size`)
    scaled by FLOPs, doubled to cover the warm-up calls it leaves out."""
    backends = attention_backends(device) if backends is None else backends
    rows: list[dict] = []
    last = None  # (flops, steady seconds) of the previous size measured
    for T in sizes:
        lengths = doc_lengths(T, median=median)
        flops = attention_flops(lengths, shape[0], shape[2])
        estimate = 2 * last[1] * flops / last[0] if last else 0.0
        if deadline.left() <= 0 or estimate > deadline.left():
            note = f"budget: ~{estimate:.0f} s needed, {max(0.0, deadline.left()):.0f} s left"
            rows += [_attention_row(T, lengths, n, "skipped", note) for n in backends]
            continue
        size_rows, steady_s = bench_attention_size(
            T, shape, device, dtype, backends, deadline, median
        )
        rows += size_rows
        last = (flops, steady_s)
    Hq, K, D = shape
    return {
        "rows": rows,
        "goals": [attention_goal(rows, goal_tokens)],
        "shape": {"Hq": Hq, "K": K, "D": D, "dtype": str(dtype).replace("torch.", "")},
        "flops": "fwd = sum_docs L(L+1)/2 * Hq * 4D; fwd+bwd = 3.5 x fwd; sdpa_masked counts "
        "the same useful work although it computes all T^2 scores",
    }
