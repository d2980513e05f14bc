"""Rotary position embedding, readable torch reference.

Legend (kernels/__init__.py): T tokens, H heads (query or key/value), D head dim (even);
added here: D2 = D / 2 rotation pairs (a suffix).
Convention: Llama's "rotate half": dims (i, i + D/2) form a pair rotated by angle
position * theta^(-2i/D). Positions are per token, so they restart at every document.
"""

import torch


def rope_inv_freq(
    head_dim: int, theta: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """inv_freq_D2 [D/2]: theta^(-2i/D) for pair i, computed in `dtype` (float32 or float64)."""
    return theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)


def rope_angles(position_ids_T: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Return (cos_TD, sin_TD) for `position_ids_T` (int, [T]); computed in float32, or float64
    when `dtype` is float64, then cast to `dtype`."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq_D2 = rope_inv_freq(head_dim, theta, position_ids_T.device, compute)
    angle_TD2 = position_ids_T.to(compute)[:, None] * inv_freq_D2[None, :]
    angle_TD = torch.cat([angle_TD2, angle_TD2], dim=-1)
    return angle_TD.cos().to(dtype), angle_TD.sin().to(dtype)


def rope_naive(x_THD: torch.Tensor, position_ids_T: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate `x_THD` ([T, H, D]) by the angles of `position_ids_T` ([T]); returns [T, H, D]."""
    cos_TD, sin_TD = rope_angles(position_ids_T, x_THD.shape[-1], theta, x_THD.dtype)
    half = x_THD.shape[-1] // 2
    rotated_THD = torch.cat([-x_THD[..., half:], x_THD[..., :half]], dim=-1)
    return x_THD * cos_TD[:, None, :] + rotated_THD * sin_TD[:, None, :]
