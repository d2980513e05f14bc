"""Start-up calibration of the adaptive placement's cost model (parallel/adaptive_cost.py):
a second of measurements on the run's own device, kernels and SP group.

Legend: L tokens of one probe document, Hq / K heads, D head dim, E model width, F MLP width.

- pair_s: attention forward + backward of one causal document of L tokens at two lengths;
  the difference over the difference of attended pairs (the fixed costs cancel);
- token_s: a [L, E] x [E, F] matmul gives the device's FLOP/s, turned into one token's
  projections and MLP as `SPCostModel.analytic` counts them;
- bytes_per_s and latency_s: an all-to-all of 4 MiB per rank, and an all-reduce of one
  number, over the SP group.

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

import torch
import torch.distributed as dist

from parallel.adaptive_cost import FWD_BWD, AttnShape, SPCostModel

PROBE_LENGTHS = (256, 1024)  # tokens of the two probe documents
LINK_BYTES = 4 << 20  # all-to-all payload per rank


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


def calibrate(
    group,
    device: torch.device,
    shape: AttnShape,
    dim: int,
    ffn_dim: int,
    fallback: SPCostModel,
    timeout_s: float,
    backend: str = "auto",
) -> tuple[SPCostModel, str]:
    """The measured cost model (or `fallback`) and one line for the run's first lines.

    Collective over every rank of the default group (the agreement) and over `group` (the
    SP group, for the link): call it on every rank."""
    t0 = time.perf_counter()
    values, why = [math.nan] * 4, ""
    try:
        values[:2] = _local_measurements(shape, dim, ffn_dim, device, backend)
    except Exception as err:  # any rank's failure must reach the others first
        why = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    if not why and time.perf_counter() - t0 > timeout_s:
        why = f"timed out after {time.perf_counter() - t0:.1f} s (limit {timeout_s:g} s)"
    flag = torch.tensor([float(bool(why))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        values[2:] = _link_measurements(group, device)
        if time.perf_counter() - t0 > timeout_s:
            why = f"timed out after {time.perf_counter() - t0:.1f} s (limit {timeout_s:g} s)"
    # The slowest rank's numbers for everyone (1 / bandwidth, so that MAX is the slowest).
    agreed = torch.tensor(
        [float(bool(why)), values[0], values[1], 1 / values[2] if values[2] else math.nan,
         values[3]], dtype=torch.float64, device=device,
    )  # fmt: skip
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    failed, pair_s, token_s, inv_bw, latency = agreed.tolist()
    if failed or not all(math.isfinite(v) and v > 0 for v in (pair_s, token_s, inv_bw)):
        reason = why or "failed or timed out on another rank"
        return fallback, (
            f"sp cost model: calibration {reason}; using the configured values "
            f"(parallel.cost_tflops, cost_link_gbps, cost_latency_us)"
        )
    model = SPCostModel(pair_s, token_s, 1 / inv_bw, max(latency, 0.0))
    return model, (
        f"sp cost model: calibrated in {time.perf_counter() - t0:.1f} s: {pair_s:.3g} s per "
        f"attended pair, {token_s:.3g} s per token, {1 / inv_bw / 1e9:.3g} GB/s, "
        f"{latency * 1e6:.0f} us per collective (per layer, forward and backward)"
    )


__all__ = ["LINK_BYTES", "PROBE_LENGTHS", "calibrate"]
