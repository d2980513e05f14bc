"""RMSNorm, readable torch reference. Legend (kernels/__init__.py): T tokens, E model width."""

import torch


def rms_norm_naive(x_TE: torch.Tensor, weight_E: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (float64 stays float64)."""
    compute = torch.float64 if x_TE.dtype == torch.float64 else torch.float32
    x = x_TE.to(compute)
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight_E.to(compute)).to(x_TE.dtype)
