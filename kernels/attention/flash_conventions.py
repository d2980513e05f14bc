"""What the flash-attention 2 family (flash-attn's varlen kernels and torch's own copy of them,
`aten._flash_attention_forward` / `_backward`) expects and returns, turned into our contract.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), Hq query heads, D head dim.

Both adapters (`flash_attn_backend`, `torch_varlen_backend`) share these rules:
- Head dims must be a multiple of 8: inputs are zero-padded to the next one, which changes no
  score (the padded coordinates add 0 to every dot product), and results are sliced back.
- A query that sees no key (Lq > Lk under causal, or Lk = 0) gets lse +inf and out 0 from the
  kernel (+inf makes p = exp(s - lse) vanish in its backward); our contract says lse -inf.
  The forward turns +inf into -inf, and the backward hands +inf back.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["FLASH_DTYPES", "MAX_HEAD_DIM", "lse_for_kernel", "pad_head_dim", "results_to_contract"]

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def pad_head_dim(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [..., head_dim] zero-padded to the next multiple of 8, with a unit last stride."""
    padded = -(-head_dim // 8) * 8
    x = x if padded == head_dim else F.pad(x, (0, padded - head_dim))
    return x if x.stride(-1) == 1 else x.contiguous()


def results_to_contract(
    out_pad_THD: torch.Tensor, lse_HT: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (out [Tq, Hq, D padded], lse [Hq, Tq] float32, +inf where a row saw no key)
    as ours: (out [Tq, Hq, head_dim] with 0 on those rows, lse with -inf on them)."""
    unseen_HT = ~torch.isfinite(lse_HT)
    lse_HT = lse_HT.masked_fill(unseen_HT, -math.inf)
    out_THD = out_pad_THD[..., :head_dim].masked_fill(unseen_HT.t()[..., None], 0)
    return out_THD, lse_HT


def lse_for_kernel(lse_HT: torch.Tensor) -> torch.Tensor:
    """Our lse [Hq, Tq] as the kernel's backward reads it: float32, contiguous, +inf for -inf."""
    return lse_HT.float().masked_fill(lse_HT == -math.inf, math.inf).contiguous()
