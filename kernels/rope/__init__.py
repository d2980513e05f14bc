"""Rotary position embedding with per-token positions (restarting per document).

Legend (kernels/__init__.py): T tokens, H heads (query or key/value), D head dim (even).

Backends: `torch` (`naive.py`, any device and dtype), `triton` (`triton_rope.py`: fused
forward and backward; CUDA, or CPU under TRITON_INTERPRET=1; float16/bfloat16/float32) and
`auto` (triton for CUDA tensors when triton is installed and the dtype is supported, else torch).
"""

import torch

from kernels._triton_utils import TRITON_DTYPES, triton_available
from kernels.rope.naive import rope_angles, rope_inv_freq, rope_naive

__all__ = ["apply_rope", "rope_angles", "rope_inv_freq", "rope_naive"]

_BACKENDS = ("auto", "torch", "triton")


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown rope backend {backend!r}; expected one of {_BACKENDS}")
    if backend != "auto":
        return backend
    usable = x.is_cuda and x.dtype in TRITON_DTYPES and triton_available()
    return "triton" if usable else "torch"


def apply_rope(
    x_THD: torch.Tensor, position_ids_T: torch.Tensor, theta: float, backend: str = "auto"
) -> torch.Tensor:
    """Apply RoPE to `x_THD` ([T, H, D], D even) at `position_ids_T` ([T], int) with base `theta`.

    Returns a tensor of the same shape and dtype. `backend`: `auto`, `torch` or `triton`.
    """
    if x_THD.dim() != 3 or x_THD.shape[-1] % 2:
        raise ValueError(f"apply_rope expects [T, H, D] with even D, got {tuple(x_THD.shape)}")
    if position_ids_T.shape != x_THD.shape[:1]:
        raise ValueError(
            f"position_ids has shape {tuple(position_ids_T.shape)}, expected ({x_THD.shape[0]},)"
        )
    if _resolve(backend, x_THD) == "triton":
        from kernels.rope.triton_rope import rope_triton

        return rope_triton(x_THD, position_ids_T, theta)
    return rope_naive(x_THD, position_ids_T, theta)
