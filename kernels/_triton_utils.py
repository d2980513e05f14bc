"""Small helpers shared by the Triton kernels: availability, interpreter, autotuning, checks.

Triton is optional: nothing here imports it at module import, so `kernels` imports on a
machine without it; the kernel modules themselves import triton and are imported lazily.

`TRITON_INTERPRET=1` (read by Triton itself when it is imported) runs kernels on CPU tensors
through numpy. We read it only to decide two things that Triton cannot decide for us:
whether CPU tensors are acceptable when a kernel really runs, and whether `@triton.autotune`
may be used (it needs a GPU driver and fails in the interpreter). Nothing reads it while
compiling: under `torch.compiler.is_compiling()` the public functions go straight to their
custom ops, whose fake implementations take tensors of any device (the planner's fake CPU
tensors stand for CUDA ones), and the device check runs inside the real implementation.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Dtypes the Triton kernels accept. float64 is left to the torch backends (the reference path).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when the `triton` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def is_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_tensors(name: str, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless Triton can run on `tensors`: importable, and CUDA tensors
    (or CPU tensors under the interpreter), all on one device.

    Call it inside a custom op's real implementation, just before the launch: that runs only
    on real tensors (eagerly, or as the compiled graph executes), never on fake ones."""
    if not triton_available():
        raise ValueError(f"{name}: the triton backend needs the `triton` package")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )
    device = next(iter(devices))
    if device.type != "cuda" and not (device.type == "cpu" and is_interpreting()):
        raise ValueError(
            f"{name}: the triton backend needs CUDA tensors (or CPU tensors with "
            f"TRITON_INTERPRET=1), got {device}"
        )


def check_dtype(name: str, dtype: torch.dtype, allowed: Sequence[torch.dtype] = TRITON_DTYPES):
    """Raise ValueError when `dtype` is not one the Triton kernel supports."""
    if dtype not in allowed:
        raise ValueError(
            f"{name}: dtype {dtype} is not supported by the triton backend "
            f"(supported: {', '.join(str(d) for d in allowed)}); use the torch backend"
        )


# `dot_precision`'s answer for bfloat16 under the interpreter (see `kernels.triton_dot.mma`).
UPCAST_BF16_DOT = "upcast_bf16"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for inputs of `dtype`, the `PRECISION` of `triton_dot.mma`.

    Exact ("ieee") for float32, so that float32 really means float32 (the default would be
    TF32 on GPUs); "tf32" (irrelevant) for 16-bit inputs; UPCAST_BF16_DOT for bfloat16 under
    the interpreter, whose bfloat16 `tl.dot` is wrong (kernels.triton_dot says how)."""
    if dtype == torch.bfloat16 and is_interpreting():
        return UPCAST_BF16_DOT
    return "ieee" if dtype == torch.float32 else "tf32"


def autotune_unless_interpreting(configs: list[Any], key: list[str]) -> Callable:
    """`triton.autotune(configs, key)` on a GPU; the identity under the interpreter.

    The kernel's launcher must then pass the tuned meta-parameters itself when interpreting:
    see `launch_meta`.
    """
    import triton

    if is_interpreting():
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


def launch_meta(kernel: Any, **defaults: Any) -> dict[str, Any]:
    """Meta-parameters to pass at launch: none for an autotuned kernel (the tuner chooses),
    `defaults` for a plain one (the interpreter path)."""
    from triton.runtime.autotuner import Autotuner

    return {} if isinstance(kernel, Autotuner) else defaults
