"""Variable-length attention, readable dense reference (materialises each document's scores).

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys; documents packed), N documents,
Hq query heads, K key/value heads, G = Hq / K, D head dim; added here: Q / C the queries /
keys of one document (Lq / Lk of them).

Causal masking is aligned bottom-right: query i of Lq sees keys j <= i + (Lk - Lq). A query
that sees no key gets out 0 and lse -inf. Math runs in the dtype of the inputs, so the same
function is both the float64 ground truth and the "same-dtype naive implementation" that
kernel errors are measured against. Differentiable by autograd in q, k, v.
"""

import math

import torch


def attn_naive(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-document softmax attention.

    Args: q_THD [Tq, Hq, D], k_TKD / v_TKD [Tk, K, D] with Hq % K == 0; cu_seqlens_q / _k
    [N + 1] (int) document boundaries; softmax_scale defaults to 1 / sqrt(D).
    Returns (out_THD [Tq, Hq, D] in q's dtype, lse_HT [Hq, Tq] natural-log log-sum-exp of the
    scaled scores, float64 for float64 inputs, else float32).
    """
    scale = 1.0 / math.sqrt(q_THD.shape[-1]) if softmax_scale is None else softmax_scale
    group = q_THD.shape[1] // k_TKD.shape[1]
    lse_dtype = torch.float64 if q_THD.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for n in range(len(bounds_q) - 1):
        q_QHD = q_THD[bounds_q[n] : bounds_q[n + 1]]
        k_CHD = k_TKD[bounds_k[n] : bounds_k[n + 1]].repeat_interleave(group, dim=1)
        v_CHD = v_TKD[bounds_k[n] : bounds_k[n + 1]].repeat_interleave(group, dim=1)
        lq, lk = q_QHD.shape[0], k_CHD.shape[0]
        s_HQC = torch.einsum("qhd,chd->hqc", q_QHD, k_CHD) * scale
        if causal:
            i_Q1 = torch.arange(lq, device=q_THD.device)[:, None]
            j_1C = torch.arange(lk, device=q_THD.device)[None, :]
            s_HQC = s_HQC.masked_fill(j_1C > i_Q1 + (lk - lq), float("-inf"))
        lse_HQ = (
            torch.logsumexp(s_HQC, dim=-1)
            if lk > 0
            else s_HQC.new_full((s_HQC.shape[0], lq), float("-inf"))
        )
        # Rows that see no key have lse -inf; shift them by 0 so exp gives 0, not NaN.
        finite_lse_HQ = torch.where(torch.isfinite(lse_HQ), lse_HQ, torch.zeros_like(lse_HQ))
        p_HQC = torch.exp(s_HQC - finite_lse_HQ[..., None])
        outs.append(torch.einsum("hqc,chd->qhd", p_HQC, v_CHD))
        lses.append(lse_HQ.to(lse_dtype))
    if not outs:  # no documents
        return q_THD.new_zeros(q_THD.shape), q_THD.new_zeros((q_THD.shape[1], 0), dtype=lse_dtype)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)
