"""RMSNorm, readable torch reference. Legend: T tokens, D model dim."""

import torch


def rms_norm_naive(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (float64 stays float64)."""
    compute = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    x = x_TD.to(compute)
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight_D.to(compute)).to(x_TD.dtype)
