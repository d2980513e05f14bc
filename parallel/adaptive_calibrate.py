"""Start-up calibration of the adaptive placement's cost model (parallel/adaptive_cost.py):
a second of measurements on the run's own device, kernels and SP group.

Legend: L tokens of one probe document, Hq / K heads, D head dim, E model width, F MLP width.

- pair_s: attention forward + backward of one causal document of L tokens at two lengths;
  the difference over the difference of attended pairs (the fixed costs cancel);
- token_s: a [L, E] x [E, F] matmul gives the device's FLOP/s, turned into one token's
  projections and MLP as `SPCostModel.analytic` counts them;
- bytes_per_s and latency_s: an all-to-all of 4 MiB per rank, and an all-reduce of one
  number, over the SP group;
- with candidate split methods (`probes`): one probe document of `probe_tokens_per_rank`
  times P tokens, whole on each rank, sets pair_s at that size instead (the attention the
  local documents get); then each method's attention forward + backward over its own groups
  on the same document, beyond what the values above predict for it, per token of a rank's
  share, is its `SPCostModel.split_overhead` (at least 0): keeping a document whole and
  splitting it are compared at the same length, with the method's own work (packing,
  merges) charged to it.

Every rank measures; the slowest value of each (an all-reduce MAX) is what all ranks use,
so the placement stays a pure function of the lengths and identical everywhere. A failure
or a calibration that runs past its time on any rank makes every rank keep the configured
values, and the returned line says so. Collectives run on every rank or on none: the local
measurements are agreed on before the link is measured.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from parallel.adaptive import (
    Placement,
    adaptive_attn_varlen_func,
    shard_packed_adaptive,
    split_local_tokens,
)
from parallel.adaptive_cost import (
    FWD_BWD,
    AttnShape,
    SPCostModel,
    SplitMethod,
    method_key,
    placement_cost,
)

PROBE_LENGTHS = (256, 1024)  # tokens of the two probe documents
LINK_BYTES = 4 << 20  # all-to-all payload per rank
# Tokens per rank of the split-method probe document: large enough on a GPU that kernels are
# not launch-bound, small enough on a CPU (our test runs) to take about a second in all.
PROBE_TOKENS_PER_RANK = {"cuda": 4096, "cpu": 512}


@dataclass(frozen=True)
class MethodProbe:
    """A candidate split method and the process groups it runs over on this rank."""

    method: SplitMethod
    ulysses_group: object
    ring_group: object


def _timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _attention_s(length: int, shape: AttnShape, device, backend: str) -> float:
    from kernels.attention import attn_varlen

    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(length, shape.n_heads, shape.head_dim, generator=g).to(device, shape.dtype)
    kv = torch.randn(length, shape.n_kv_heads, shape.head_dim, generator=g)
    k, v = kv.to(device, shape.dtype), kv.flip(0).to(device, shape.dtype)
    cu = torch.tensor([0, length], dtype=torch.int32, device=device)

    def step():
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = attn_varlen(*x, cu, cu, length, length, True, None, backend)
        out.sum().backward()

    return _timed(step, device)


def _local_measurements(shape: AttnShape, dim: int, ffn_dim: int, device, backend: str):
    """(pair_s, token_s) on this rank."""
    short, long = PROBE_LENGTHS
    t_short, t_long = (_attention_s(n, shape, device, backend) for n in (short, long))
    pairs = [n * (n + 1) // 2 for n in (short, long)]
    pair_s = (t_long - t_short) / (pairs[1] - pairs[0])
    if not pair_s > 0:  # noise larger than the difference: the whole long probe then
        pair_s = t_long / pairs[1]
    x = torch.randn(long, dim).to(device, shape.dtype)
    w = torch.randn(dim, ffn_dim).to(device, shape.dtype)
    flops_per_s = 2 * long * dim * ffn_dim / _timed(lambda: x @ w, device)
    weights = dim * (2 * shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim + 3 * dim * ffn_dim
    return pair_s, FWD_BWD * 2 * weights / flops_per_s


def _link_measurements(group, device) -> tuple[float, float]:
    """(bytes_per_s, latency_s) of this rank over `group`."""
    P = dist.get_world_size(group)
    n = LINK_BYTES // 4 // P * P
    send, recv = torch.ones(n, device=device), torch.empty(n, device=device)
    t = _timed(lambda: dist.all_to_all_single(recv, send, group=group), device)
    one = torch.ones(1, device=device)
    latency = _timed(lambda: dist.all_reduce(one, group=group), device, repeats=5)
    sent = 4 * n * (P - 1) / P
    return sent / max(t - latency, 1e-9), latency


def method_probes(methods: list[SplitMethod], dims) -> list[MethodProbe]:
    """Each of `methods` with the groups of the grid of `dims` (or of `dims.alternate`) whose
    ulysses x ring it has; a method no grid has is left out (its overhead stays 0)."""
    grids = [d for d in (dims, getattr(dims, "alternate", None)) if d is not None]
    out = []
    for m in methods:
        grid = next((d for d in grids if (d.ulysses, d.ring) == (m.ulysses, m.ring)), None)
        if grid is not None:
            out.append(MethodProbe(m, grid.ulysses_group, grid.ring_group))
    return out


def probe_tokens_per_rank(device: torch.device) -> int:
    """Tokens per SP rank of the split-method probe document on `device` (even: a multiple of
    2 R and of U once times P, so the layouts add no padding)."""
    return PROBE_TOKENS_PER_RANK.get(device.type, PROBE_TOKENS_PER_RANK["cuda"])


def _split_step(probe: MethodProbe, n: int, sp_rank: int, shape: AttnShape, device, backend):
    """A closure running `probe`'s method forward + backward on this rank's share of one
    document of `n` tokens (every rank of the SP group must run it alike: it communicates)."""
    m = probe.method
    cu = torch.tensor([0, n])
    layout = shard_packed_adaptive(cu, n, Placement((-1,), m.ring * m.ulysses), m.ring,
                                   m.ulysses, sp_rank, m.ring_impl)  # fmt: skip
    t = len(layout.local_index_T)
    g = torch.Generator(device="cpu").manual_seed(sp_rank)
    q = torch.randn(t, shape.n_heads, shape.head_dim, generator=g).to(device, shape.dtype)
    kv = torch.randn(2, t, shape.n_kv_heads, shape.head_dim, generator=g).to(device, shape.dtype)

    def step():
        x = [a.detach().requires_grad_() for a in (q, kv[0], kv[1])]
        out = adaptive_attn_varlen_func(probe.ulysses_group, probe.ring_group, *x,
                                        layout.attn_meta, True, None, backend)  # fmt: skip
        out.sum().backward()

    return step


def _overheads(probes, n: int, seconds, model: SPCostModel, shape) -> dict[str, float]:
    """Per probed method, seconds per token of a rank's share of the document of `n` tokens
    beyond `model`'s prediction for its attention and communication (at least 0: a method
    faster than predicted is not extrapolated to be faster still on longer documents)."""
    attention_only = replace(model, token_s=0.0, split_overheads=())
    out = {}
    for probe, measured in zip(probes, seconds):
        m = probe.method
        placement = Placement((-1,), m.ring * m.ulysses)
        predicted = placement_cost([n], placement, m.ring, m.ulysses, m.ring_impl, shape,
                                   attention_only).seconds  # fmt: skip
        per_rank = split_local_tokens([n], m.ring, m.ulysses)
        out[method_key(m.ring, m.ulysses, m.ring_impl)] = max(measured - predicted, 0) / per_rank
    return out


def calibrate(
    group,
    device: torch.device,
    shape: AttnShape,
    dim: int,
    ffn_dim: int,
    fallback: SPCostModel,
    timeout_s: float,
    backend: str = "auto",
    probes: list[MethodProbe] = (),
    sp_rank: int = 0,
) -> tuple[SPCostModel, str]:
    """The measured cost model (or `fallback`) and one line for the run's first lines.

    `probes`: the candidate split methods to measure (their overheads stay 0 without), run as
    SP rank `sp_rank`. Collective over every rank of the default group (the agreements), over
    `group` (the SP group, for the link) and over the probes' groups: call it on every rank."""
    t0 = time.perf_counter()
    values, why = [math.nan] * 4, ""
    sp_size = max((p.method.ring * p.method.ulysses for p in probes), default=1)
    steps, n = [], probe_tokens_per_rank(device) * sp_size
    whole_s = math.nan  # the probe document whole on this rank (pair_s at that length)
    try:
        values[:2] = _local_measurements(shape, dim, ffn_dim, device, backend)
        if probes:
            whole_s = _attention_s(n, shape, device, backend)
            steps = [_split_step(p, n, sp_rank, shape, device, backend) for p in probes]
    except Exception as err:  # any rank's failure must reach the others first
        why = f"{type(err).__name__}: {err}".splitlines()[0][:200]

    def late() -> str:
        took = time.perf_counter() - t0
        return f"timed out after {took:.1f} s (limit {timeout_s:g} s)" if took > timeout_s else ""

    why = why or late()
    if _agree_failed(why, device) == 0:
        values[2:] = _link_measurements(group, device)
        why = late()
    # The split methods communicate: every rank runs them, or none does.
    seconds = [math.nan] * len(probes)
    if probes and _agree_failed(why, device) == 0:
        seconds = [_timed(step, device) for step in steps]
        why = late()
    # The slowest rank's numbers for everyone (1 / bandwidth, so that MAX is the slowest).
    agreed = torch.tensor(
        [float(bool(why)), values[0], values[1], 1 / values[2] if values[2] else math.nan,
         values[3], whole_s, *seconds], dtype=torch.float64, device=device,
    )  # fmt: skip
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    failed, pair_s, token_s, inv_bw, latency, whole_s, *seconds = agreed.tolist()
    measured = (pair_s, token_s, inv_bw, *((whole_s, *seconds) if probes else ()))
    if failed or not all(math.isfinite(v) and v > 0 for v in measured):
        reason = why or "failed or timed out on another rank"
        return fallback, (
            f"sp cost model: calibration {reason}; using the configured values "
            f"(parallel.cost_tflops, cost_link_gbps, cost_latency_us)"
        )
    if probes:  # documents kept whole cost what the probe document whole did, per pair
        pair_s = whole_s / (n * (n + 1) // 2)
    model = SPCostModel(pair_s, token_s, 1 / inv_bw, max(latency, 0.0))
    overheads = _overheads(probes, n, seconds, model, shape)
    model = replace(model, split_overheads=tuple(overheads.items()))
    split = ""
    if overheads:
        extra = ", ".join(f"{k} {s * 1e6:.3g} us" for k, s in overheads.items())
        split = f"; split methods cost per token beyond that ({n}-token probe): {extra}"
    return model, (
        f"sp cost model: calibrated in {time.perf_counter() - t0:.1f} s: {pair_s:.3g} s per "
        f"attended pair, {token_s:.3g} s per token, {1 / inv_bw / 1e9:.3g} GB/s, "
        f"{latency * 1e6:.0f} us per collective (per layer, forward and backward){split}"
    )


def _agree_failed(why: str, device) -> float:
    """1.0 when any rank has a reason to stop, else 0.0 (an all-reduce over every rank)."""
    flag = torch.tensor([float(bool(why))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item()


__all__ = [
    "LINK_BYTES",
    "PROBE_LENGTHS",
    "PROBE_TOKENS_PER_RANK",
    "MethodProbe",
    "calibrate",
    "method_probes",
    "probe_tokens_per_rank",
]
