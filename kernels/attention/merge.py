"""Merge two partial attention results computed over disjoint key sets, by log-sum-exp.

Legend (kernels/__init__.py): T query tokens, Hq query heads (H in names), D head dim.

With partials (out_a, lse_a) over keys A and (out_b, lse_b) over keys B, attention over A u B is
    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.
A side with lse -inf (it saw no key) gets weight 0; when both are -inf the result is out 0,
lse -inf, and the gradients stay finite (0). Differentiable by autograd in all four inputs.
"""

import torch

from kernels.precision import acc_dtype


def merge_attn_partials(
    out_a_THD: torch.Tensor,
    lse_a_HT: torch.Tensor,
    out_b_THD: torch.Tensor,
    lse_b_HT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partials over disjoint key sets.

    Args: out_a_THD / out_b_THD [T, Hq, D] (any float dtype, both the same), lse_a_HT /
    lse_b_HT [Hq, T] natural-log log-sum-exp (-inf where a row saw no key).
    Returns (out_THD [T, Hq, D] in the outputs' dtype, lse_HT [Hq, T]); the arithmetic runs in
    float32, or float64 when either input is float64; lse is float32 (float64 likewise).
    """
    if out_a_THD.shape != out_b_THD.shape or out_a_THD.dim() != 3:
        raise ValueError(
            f"merge_attn_partials: outputs must both be [T, Hq, D], got "
            f"{tuple(out_a_THD.shape)} and {tuple(out_b_THD.shape)}"
        )
    T, Hq, _ = out_a_THD.shape
    if lse_a_HT.shape != (Hq, T) or lse_b_HT.shape != (Hq, T):
        raise ValueError(
            f"merge_attn_partials: lse must be [Hq, T] = {(Hq, T)}, got "
            f"{tuple(lse_a_HT.shape)} and {tuple(lse_b_HT.shape)}"
        )
    compute = acc_dtype(out_a_THD.dtype, lse_a_HT.dtype, out_b_THD.dtype, lse_b_HT.dtype)
    lse_a, lse_b = lse_a_HT.to(compute), lse_b_HT.to(compute)
    lse_max = torch.maximum(lse_a, lse_b)
    # Shift by a finite max, so exp(-inf - shift) is 0 and never exp(-inf + inf) = NaN.
    shift = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    w_a, w_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = w_a + w_b
    seen = total > 0
    # Where no side saw a key, divide by 1 instead of 0 (the weights are 0 there anyway).
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse_HT = torch.where(seen, shift + torch.log(safe_total), torch.full_like(total, -torch.inf))
    scale_a_TH1 = (w_a / safe_total).t()[..., None]
    scale_b_TH1 = (w_b / safe_total).t()[..., None]
    out_THD = scale_a_TH1 * out_a_THD.to(compute) + scale_b_TH1 * out_b_THD.to(compute)
    return out_THD.to(out_a_THD.dtype), lse_HT
