"""RMSNorm over the last dimension.

Legend (kernels/__init__.py): T tokens (any leading dims), E the normalised width.

Backends: `torch` (`torch_norm.py`: torch ops with a backward that keeps only x and the
reciprocal RMS; any device and dtype; `naive.py` is the readable reference), `triton`
(`triton_norm.py`: fused forward and backward; CUDA, or CPU under TRITON_INTERPRET=1;
float16/bfloat16/float32) and `auto` (triton for CUDA tensors when triton is installed and
the dtype is supported, else torch).
"""

import torch

from kernels._triton_utils import TRITON_DTYPES, triton_available
from kernels.norm.naive import rms_norm_naive
from kernels.norm.torch_norm import rms_norm_torch

__all__ = ["rms_norm", "rms_norm_naive", "rms_norm_torch"]

_BACKENDS = ("auto", "torch", "triton")


def _resolve(backend: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown norm backend {backend!r}; expected one of {_BACKENDS}")
    if backend != "auto":
        return backend
    dtypes_ok = x.dtype in TRITON_DTYPES and weight.dtype in TRITON_DTYPES
    return "triton" if x.is_cuda and dtypes_ok and triton_available() else "torch"


def rms_norm(
    x_TE: torch.Tensor, weight_E: torch.Tensor, eps: float = 1e-5, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm of `x_TE` ([..., E]) scaled by `weight_E` ([E]); same shape and dtype as x.

    `backend`: `auto`, `torch` or `triton`.
    """
    if x_TE.shape[-1] != weight_E.shape[-1]:
        raise ValueError(f"rms_norm: x has dim {x_TE.shape[-1]}, weight has {weight_E.shape[-1]}")
    if _resolve(backend, x_TE, weight_E) == "triton":
        from kernels.norm.triton_norm import rms_norm_triton

        return rms_norm_triton(x_TE, weight_E, eps)
    return rms_norm_torch(x_TE, weight_E, eps)
