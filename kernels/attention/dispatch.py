"""Which attention backend runs: names, the `auto` rule, and the lazily imported fwd / bwd.

A backend is a module with a forward and a backward function of one signature (see
`kernels.attention.attn_varlen_fwd` / `attn_varlen_bwd`); only the chosen one is imported,
so `kernels` imports without triton or flash-attn installed.
"""

import importlib
import importlib.util
from collections.abc import Callable

import torch

__all__ = [
    "BACKENDS",
    "backend_fns",
    "check_backend_name",
    "describe_backend_choice",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton", "flash_attn", "torch_varlen")
_MODULES = {  # backend -> (module, forward function, backward function)
    "torch": ("kernels.attention.torch_blockwise", "torch_attn_fwd", "torch_attn_bwd"),
    "triton": ("kernels.attention.triton_attn", "triton_attn_fwd", "triton_attn_bwd"),
    "flash_attn": ("kernels.attention.flash_attn_backend", "flash_attn_fwd", "flash_attn_bwd"),
    "torch_varlen": (
        "kernels.attention.torch_varlen_backend",
        "torch_varlen_fwd",
        "torch_varlen_bwd",
    ),
}
_CUDA_ONLY = ("flash_attn", "torch_varlen")
# The flash kernels (flash-attn's and torch's copy) take 16-bit inputs only.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)

# Looked up once (find_spec does not import it), so torch.compile sees constants.
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_HAS_TORCH_FLASH = bool(
    getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)()
)


def check_backend_name(backend: str) -> None:
    """Raise ValueError unless `backend` is one of BACKENDS (no device needed)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _auto_choice(device_type: str, dtype: torch.dtype | None) -> tuple[str, str]:
    """(backend, why) of `auto` for tensors of `dtype` (None: a 16-bit one) on `device_type`."""
    if device_type != "cuda":
        return "torch", f"on {device_type}"
    if dtype is not None and dtype not in _FLASH_DTYPES:
        if dtype == torch.float64:  # no GPU kernel takes float64; the torch path does
            return "torch", "on cuda for float64"
        return "triton", f"on cuda for {dtype}: the flash kernels take 16-bit inputs only"
    if _HAS_FLASH_ATTN:
        return "flash_attn", "on cuda: flash-attn is installed"
    if _HAS_TORCH_FLASH:
        return "torch_varlen", "on cuda: flash-attn is not installed; torch's flash kernels are"
    return "triton", "on cuda: neither flash-attn nor torch's flash kernels are available"


def resolve_backend(
    backend: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> str:
    """Turn `backend` (one of BACKENDS) into a concrete backend for tensors on `device`.

    `auto` on CUDA: flash_attn when importable, else torch_varlen (torch's own flash kernels)
    when this torch has them, else triton; float32 takes triton and float64 torch (the flash
    kernels take float16 / bfloat16 only; `dtype` None means a 16-bit one). Off CUDA: torch.
    Raises ValueError for an unknown name or a CUDA-only backend off CUDA.
    """
    check_backend_name(backend)
    device_type = torch.device(device).type
    if backend == "auto":
        return _auto_choice(device_type, dtype)[0]
    if backend in _CUDA_ONLY and device_type != "cuda":
        raise ValueError(f"attention backend {backend!r} needs CUDA tensors, got {device_type}")
    return backend


def describe_backend_choice(
    backend: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> str:
    """One line for a run's first lines: the attention backend that runs, and why."""
    check_backend_name(backend)
    device_type = torch.device(device).type
    if backend != "auto":
        return f"attention: {resolve_backend(backend, device, dtype)} (as configured)"
    chosen, why = _auto_choice(device_type, dtype)
    return f"attention: {chosen} (auto {why})"


def backend_fns(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) of a concrete backend (not `auto`), imported on first use."""
    module_name, fwd_name, bwd_name = _MODULES[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"attention backend {backend!r} needs {module_name}: {e}") from e
    return getattr(module, fwd_name), getattr(module, bwd_name)
