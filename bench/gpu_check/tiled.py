"""The tiled section: the tiled loss and the tiled MLP against their materialised forms."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.gpu_check.common import GIB, Deadline, error_text, max_abs_err, say, sync


def measure(fn: Callable[[], object], device: str) -> tuple[object, float, int | None]:
    """(result, seconds, peak extra bytes) of `fn()` after one warm-up call. Peak extra: the
    CUDA allocator's high-water mark during the call less what was allocated before it
    (None on CPU, where the allocator keeps no such count)."""
    fn()
    sync(device)
    base = 0
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return result, seconds, peak


def _compare(kernel: str, variant: str, measured, reference, names: tuple[str, ...]) -> dict:
    """A tiled row: time, peak memory (and its ratio to the reference's), and the max |diff|
    of each result against the reference's (`names` them, in order)."""
    (value, seconds, peak), (ref_value, _, ref_peak) = measured, reference
    diffs = {n: max_abs_err(a, b) for n, a, b in zip(names, value, ref_value)}
    return {
        "kernel": kernel,
        "variant": variant,
        "status": "ok",
        "ms": 1e3 * seconds,
        "peak_gib": None if peak is None else peak / GIB,
        "memory_ratio": peak / ref_peak if peak is not None and ref_peak else None,
        "max_diff": max(diffs.values()),
        "diffs": diffs,
        "note": "",
    }


def tiled_loss_rows(
    device: str, T: int, E: int, V: int, dtype: torch.dtype, tile: int, backends: list[str]
) -> list[dict]:
    """kernels.loss.linear_cross_entropy (each backend) against materialised logits + CE
    (`linear_cross_entropy_naive`), forward + backward; peak memory includes the gradients."""
    from kernels.loss import linear_cross_entropy, linear_cross_entropy_naive

    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, E, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, E, device=device, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=device, generator=gen)
    labels[::7] = -100  # ignored tokens, as padding and prompts give
    weights = torch.rand(T, device=device, generator=gen)

    def step(backend: str | None):
        if backend is None:
            loss = linear_cross_entropy_naive(hidden, weight, labels, weights)
        else:
            loss = linear_cross_entropy(hidden, weight, labels, weights, -100, tile, backend)
        return (loss.detach().reshape(1), *torch.autograd.grad(loss, (hidden, weight)))

    names = ("loss", "dhidden", "dweight")
    ref = measure(lambda: step(None), device)
    rows = [_compare("loss", "materialised", ref, ref, names)]
    for backend in backends:
        try:
            measured = measure(lambda b=backend: step(b), device)
            rows.append(_compare("loss", f"tiled {backend}, {tile} tokens", measured, ref, names))
        except Exception as err:
            rows.append(
                {
                    "kernel": "loss",
                    "variant": f"tiled {backend}",
                    "status": "error",
                    "note": error_text(err),
                }
            )
    return rows


def tiled_mlp_rows(
    device: str, T: int, E: int, F_: int, dtype: torch.dtype, budget_mib: float
) -> list[dict]:
    """The model's SwiGLU through `tiled_apply` (tiles from `budget_mib`, as
    train.memory.mlp_tiles=0 picks them) against the untiled module, forward + backward;
    dw is the largest difference over w1, w2, w3."""
    from longtrain.distributed.memory import num_mlp_tiles, tiled_apply
    from longtrain.model.llama import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(E, F_).to(device=device, dtype=dtype)
    params = list(mlp.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, E, device=device, generator=gen).to(dtype)
    dout = torch.randn(T, E, device=device, generator=gen).to(dtype)
    tiles = num_mlp_tiles(T, F_, dtype.itemsize, 0, budget_mib)

    def step(n: int):
        for w in params:
            w.grad = None
        x_TE = x.detach().requires_grad_()
        out = tiled_apply(mlp, x_TE, n, params) if n > 1 else mlp(x_TE)
        out.backward(dout)  # tiled_apply accumulates parameter gradients inside the backward
        dw = torch.cat([w.grad.reshape(-1) for w in params])
        return out.detach(), x_TE.grad, dw

    names = ("out", "dx", "dw")
    ref = measure(lambda: step(1), device)
    measured = measure(lambda: step(tiles), device)
    return [
        _compare("mlp", "untiled", ref, ref, names),
        _compare("mlp", f"tiled, {tiles} tiles", measured, ref, names),
    ]


def section_tiled(
    device: str,
    deadline: Deadline,
    loss_shape: tuple[int, int, int],
    mlp_shape: tuple[int, int, int],
    dtype: torch.dtype,
    loss_tile: int = 4096,
    mlp_budget_mib: float = 256.0,
) -> dict:
    """The tiled loss (loss_shape = T, E, V) and tiled MLP (mlp_shape = T, E, F) rows."""
    backends = ["torch", "triton"] if device == "cuda" else ["torch"]
    parts = {
        "loss": lambda: tiled_loss_rows(device, *loss_shape, dtype, loss_tile, backends),
        # The tiled MLP lives in longtrain (whose package needs hydra): it may fail alone.
        "mlp": lambda: tiled_mlp_rows(device, *mlp_shape, dtype, mlp_budget_mib),
    }
    rows = []
    for kernel, part in parts.items():
        if deadline.left() <= 0:
            rows.append({"kernel": kernel, "status": "skipped", "note": "section budget spent"})
            continue
        try:
            rows += part()
        except Exception as err:  # the other part still runs
            rows.append({"kernel": kernel, "status": "error", "note": error_text(err)})
        say(f"tiled {kernel}: {[r['status'] for r in rows if r['kernel'] == kernel]}")
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "rows": rows,
        "shapes": {
            "loss_T_E_V": loss_shape,
            "mlp_T_E_F": mlp_shape,
            "dtype": str(dtype).replace("torch.", ""),
        },
    }
