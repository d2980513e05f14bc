"""Linear + cross-entropy, readable reference that materialises all [T, V] logits.

Legend (kernels/__init__.py): T tokens, E model width, V vocabulary size.
"""

import torch
import torch.nn.functional as F


def linear_cross_entropy_naive(
    hidden_TE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_T: torch.Tensor,
    token_weights_T: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum over tokens of w_t * CE(hidden_t @ weight.T, label_t); ignored labels add 0.

    Args: hidden_TE [T, E], weight_VE [V, E], labels_T [T] int, token_weights_T [T] or None
    (all ones). Math in float32, or float64 when either input is float64.
    Returns a scalar in that compute dtype; differentiable by autograd.
    """
    wide = torch.float64 in (hidden_TE.dtype, weight_VE.dtype)
    compute = torch.float64 if wide else torch.float32
    logits_TV = hidden_TE.to(compute) @ weight_VE.to(compute).t()
    ce_T = F.cross_entropy(logits_TV, labels_T.long(), ignore_index=ignore_index, reduction="none")
    if token_weights_T is not None:
        ce_T = ce_T * token_weights_T.to(compute)
    return ce_T.sum()
