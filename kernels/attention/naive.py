"""Variable-length attention, readable dense reference (materialises each document's scores).

Legend: T query tokens (all documents packed), S key tokens, H query heads, K key/value heads,
G = H / K query heads per key/value head, D head dim, B documents, Lq / Lk one document's
query / key count.

Causal masking is aligned bottom-right: query i of Lq sees keys j <= i + (Lk - Lq). A query
that sees no key gets out 0 and lse -inf. Math runs in the dtype of the inputs, so the same
function is both the float64 ground truth and the "same-dtype naive implementation" that
kernel errors are measured against. Differentiable by autograd in q, k, v.
"""

import math

import torch


def attn_naive(
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-document softmax attention.

    Args: q_THD [T, H, D], k_SKD / v_SKD [S, K, D] with H % K == 0; cu_seqlens_q / _k [B + 1]
    (int) document boundaries; softmax_scale defaults to 1 / sqrt(D).
    Returns (out_THD [T, H, D] in q's dtype, lse_HT [H, T] natural-log log-sum-exp of the
    scaled scores, float64 for float64 inputs, else float32).
    """
    scale = 1.0 / math.sqrt(q_THD.shape[-1]) if softmax_scale is None else softmax_scale
    group = q_THD.shape[1] // k_SKD.shape[1]
    lse_dtype = torch.float64 if q_THD.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q_LHD = q_THD[bounds_q[b] : bounds_q[b + 1]]
        k_LHD = k_SKD[bounds_k[b] : bounds_k[b + 1]].repeat_interleave(group, dim=1)
        v_LHD = v_SKD[bounds_k[b] : bounds_k[b + 1]].repeat_interleave(group, dim=1)
        lq, lk = q_LHD.shape[0], k_LHD.shape[0]
        s_HQK = torch.einsum("qhd,khd->hqk", q_LHD, k_LHD) * scale
        if causal:
            i_Q1 = torch.arange(lq, device=q_THD.device)[:, None]
            j_1K = torch.arange(lk, device=q_THD.device)[None, :]
            s_HQK = s_HQK.masked_fill(j_1K > i_Q1 + (lk - lq), float("-inf"))
        lse_HQ = (
            torch.logsumexp(s_HQK, dim=-1)
            if lk > 0
            else s_HQK.new_full((s_HQK.shape[0], lq), float("-inf"))
        )
        # Rows that see no key have lse -inf; shift them by 0 so exp gives 0, not NaN.
        finite_lse_HQ = torch.where(torch.isfinite(lse_HQ), lse_HQ, torch.zeros_like(lse_HQ))
        p_HQK = torch.exp(s_HQK - finite_lse_HQ[..., None])
        outs.append(torch.einsum("hqk,khd->qhd", p_HQK, v_LHD))
        lses.append(lse_HQ.to(lse_dtype))
    if not outs:  # no documents
        return q_THD.new_zeros(q_THD.shape), q_THD.new_zeros((q_THD.shape[1], 0), dtype=lse_dtype)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
