"""Float64 references written independently of the kernels they check (no kernels import).

Legend (kernels/__init__.py): T tokens, H heads, D head dim (even); D2 = D / 2 pairs.
"""

import torch


def rope_complex(x_THD: torch.Tensor, position_ids_T: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication, in float64: the pair (x_i, x_{i + D2}) of token t is the
    complex number x_i + j x_{i + D2}, multiplied by exp(j * pos_t * theta^(-i / D2))
    (Llama's rotate-half layout). Returns [T, H, D] float64."""
    D2 = x_THD.shape[-1] // 2
    x = x_THD.double()
    inv_freq_D2 = 1.0 / theta ** (torch.arange(D2, dtype=torch.float64) / D2)
    angle_TD2 = position_ids_T.double()[:, None] * inv_freq_D2[None, :]
    rotation_TD2 = torch.polar(torch.ones_like(angle_TD2), angle_TD2)
    z_THD2 = torch.complex(x[..., :D2], x[..., D2:]) * rotation_TD2[:, None, :]
    return torch.cat([z_THD2.real, z_THD2.imag], dim=-1)
