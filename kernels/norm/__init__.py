"""RMSNorm over the last dimension."""

import torch

from kernels.norm.naive import rms_norm_naive

__all__ = ["rms_norm", "rms_norm_naive"]


def rms_norm(
    x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float = 1e-5, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm of `x_TD` ([..., D]) scaled by `weight_D` ([D]); same shape and dtype as x.

    `backend`: `auto` or `torch`.
    """
    if x_TD.shape[-1] != weight_D.shape[-1]:
        raise ValueError(f"rms_norm: x has dim {x_TD.shape[-1]}, weight has {weight_D.shape[-1]}")
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown norm backend {backend!r}; expected auto or torch")
    return rms_norm_naive(x_TD, weight_D, eps)
