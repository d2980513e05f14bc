"""Which attention backend runs: names, the `auto` rule, and the lazily imported fwd / bwd.

A backend is a module with a forward and a backward function of one signature (see
`kernels.attention.attn_varlen_fwd` / `attn_varlen_bwd`); only the chosen one is imported,
so `kernels` imports without triton or flash-attn installed.
"""

import importlib
import importlib.util
from collections.abc import Callable

import torch

__all__ = ["BACKENDS", "backend_fns", "check_backend_name", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton", "flash_attn")
_MODULES = {  # backend -> (module, forward function, backward function)
    "torch": ("kernels.attention.torch_blockwise", "torch_attn_fwd", "torch_attn_bwd"),
    "triton": ("kernels.attention.triton_attn", "triton_attn_fwd", "triton_attn_bwd"),
    "flash_attn": ("kernels.attention.flash_attn_backend", "flash_attn_fwd", "flash_attn_bwd"),
}

# Looked up once (find_spec does not import it), so torch.compile sees a constant.
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def check_backend_name(backend: str) -> None:
    """Raise ValueError unless `backend` is one of BACKENDS (no device needed)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn `backend` (one of BACKENDS) into a concrete backend for tensors on `device`.

    `auto`: flash_attn if importable and on CUDA, else triton on CUDA, else torch.
    Raises ValueError for an unknown name or flash_attn off CUDA.
    """
    check_backend_name(backend)
    device_type = torch.device(device).type
    if backend == "auto":
        if device_type == "cuda":
            return "flash_attn" if _HAS_FLASH_ATTN else "triton"
        return "torch"
    if backend == "flash_attn" and device_type != "cuda":
        raise ValueError(f"attention backend 'flash_attn' needs CUDA tensors, got {device_type}")
    return backend


def backend_fns(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) of a concrete backend (not `auto`), imported on first use."""
    module_name, fwd_name, bwd_name = _MODULES[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"attention backend {backend!r} needs {module_name}: {e}") from e
    return getattr(module, fwd_name), getattr(module, bwd_name)
