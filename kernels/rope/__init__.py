"""Rotary position embedding with per-token positions (restarting per document)."""

import torch

from kernels.rope.naive import rope_angles, rope_naive

__all__ = ["apply_rope", "rope_angles", "rope_naive"]


def apply_rope(
    x_THD: torch.Tensor, position_ids_T: torch.Tensor, theta: float, backend: str = "auto"
) -> torch.Tensor:
    """Apply RoPE to `x_THD` ([T, H, D], D even) at `position_ids_T` ([T], int) with base `theta`.

    Returns a tensor of the same shape and dtype. `backend`: `auto` or `torch`.
    """
    if x_THD.dim() != 3 or x_THD.shape[-1] % 2:
        raise ValueError(f"apply_rope expects [T, H, D] with even D, got {tuple(x_THD.shape)}")
    if position_ids_T.shape != x_THD.shape[:1]:
        raise ValueError(
            f"position_ids has shape {tuple(position_ids_T.shape)}, expected ({x_THD.shape[0]},)"
        )
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown rope backend {backend!r}; expected auto or torch")
    return rope_naive(x_THD, position_ids_T, theta)
