"""The `torch_varlen` backend of `attn_varlen`: torch's own CUDA varlen flash attention.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys; documents packed), N documents,
Hq query heads, K key/value heads (Hq % K == 0; the kernel takes GQA natively), D head dim.

torch ships the flash-attention 2 varlen kernels itself (`torch.nn.attention.varlen.varlen_attn`
is built on them), so this backend needs no flash-attn install. It calls the aten ops that
function wraps, `aten._flash_attention_forward` / `_flash_attention_backward`, because our
backward contract starts from the forward's (out, lse) and ring attention drives the backward
block by block: `varlen_attn`'s autograd would keep its own saved tensors instead.

GPU only (CUDA tensors, float16 / bfloat16, D <= 256; flash attention needs sm80 or newer).
Conventions of the kernel, turned into ours by `flash_conventions`: lse [Hq, Tq] float32 (the
varlen layout of aten's meta function), +inf for a row that sees no key, head dims a multiple
of 8, causal aligned bottom-right when Lq != Lk (flash-attn >= 2.1, which torch carries).
Dropout is always 0, so the backward's RNG state is a placeholder, as in `varlen_attn`.
"""

import torch

from kernels.attention.args import check_attn_args, default_softmax_scale
from kernels.attention.flash_conventions import (
    FLASH_DTYPES,
    MAX_HEAD_DIM,
    lse_for_kernel,
    pad_head_dim,
    results_to_contract,
)

__all__ = ["torch_varlen_available", "torch_varlen_bwd", "torch_varlen_fwd"]


def torch_varlen_available() -> bool:
    """True when this torch build carries the CUDA flash kernels and a CUDA device is usable
    (the check `auto` makes; it does not look at the GPU's compute capability)."""
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)
    return torch.cuda.is_available() and bool(flash_built())


def _check_cuda(name: str, *tensors: torch.Tensor) -> None:
    if not all(t.is_cuda for t in tensors):
        raise ValueError(
            f"{name}: torch's varlen flash attention needs CUDA tensors, got {tensors[0].device}"
        )


# The two kernel calls, apart so that CPU tests can stand a reference in for them.
def _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """aten's varlen flash forward: (out [Tq, Hq, Dp], lse [Hq, Tq] float32)."""
    out, lse, _rng_state, _unused, _debug = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )
    return out, lse


def _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    """aten's varlen flash backward: (dq [Tq, Hq, Dp], dk [Tk, K, Dp], dv [Tk, K, Dp])."""
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # unused: dropout is 0
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused,
        scale=scale,
    )  # fmt: skip
    return dq, dk, dv


def _kernel_meta(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, D, scale):
    """The kernel's view of the boundaries and flags: int32 cu_seqlens, ints, the scale."""
    return (
        cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), int(max_seqlen_q),
        int(max_seqlen_k), bool(causal), default_softmax_scale(D, scale),
    )  # fmt: skip


def torch_varlen_fwd(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward on torch's flash kernels (no autograd).

    q_THD [Tq, Hq, D], k_TKD / v_TKD [Tk, K, D] (float16 / bfloat16, D <= 256, CUDA);
    cu_seqlens_* [N + 1] int; causal aligned bottom-right. Returns (out_THD [Tq, Hq, D] in q's
    dtype, lse_HT [Hq, Tq] float32, natural log; a query that sees no key has out 0 and lse
    -inf).
    """
    check_attn_args(
        "torch_varlen_fwd", q_THD, k_TKD, v_TKD, cu_seqlens_q, cu_seqlens_k, dtypes=FLASH_DTYPES,
        max_head_dim=MAX_HEAD_DIM,
    )  # fmt: skip
    _check_cuda("torch_varlen_fwd", q_THD, k_TKD, v_TKD)
    Tq, Hq, D = q_THD.shape
    if Tq == 0 or k_TKD.shape[0] == 0:  # no query, or no key at all: nothing to launch
        lse_HT = q_THD.new_full((Hq, Tq), float("-inf"), dtype=torch.float32)
        return torch.zeros_like(q_THD), lse_HT
    meta = _kernel_meta(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, D,
                        softmax_scale)  # fmt: skip
    out_pad, lse_HT = _flash_forward(
        pad_head_dim(q_THD, D), pad_head_dim(k_TKD, D), pad_head_dim(v_TKD, D), *meta
    )
    if lse_HT.shape != (Hq, Tq):
        raise RuntimeError(
            f"torch_varlen_fwd: expected the varlen lse as [Hq, Tq] = {(Hq, Tq)}, got "
            f"{tuple(lse_HT.shape)} (a torch whose flash kernels use another layout)"
        )
    return results_to_contract(out_pad, lse_HT, D)


def torch_varlen_bwd(
    dout_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    out_THD: torch.Tensor,
    lse_HT: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen attention backward on torch's flash kernels (no autograd), from the forward's
    (out, lse), so ring attention can call it per block.

    Shapes as `torch_varlen_fwd`; dout_THD / out_THD [Tq, Hq, D], lse_HT [Hq, Tq] (ours: -inf
    for a row that saw no key). Returns (dq [Tq, Hq, D], dk [Tk, K, D], dv [Tk, K, D]).
    """
    check_attn_args(
        "torch_varlen_bwd", q_THD, k_TKD, v_TKD, cu_seqlens_q, cu_seqlens_k, dtypes=FLASH_DTYPES,
        max_head_dim=MAX_HEAD_DIM, dout_THD=dout_THD, out_THD=out_THD, lse_HT=lse_HT,
    )  # fmt: skip
    _check_cuda("torch_varlen_bwd", q_THD, k_TKD, v_TKD)
    D = q_THD.shape[-1]
    if q_THD.shape[0] == 0 or k_TKD.shape[0] == 0:  # no score exists, so no gradient flows
        return torch.zeros_like(q_THD), torch.zeros_like(k_TKD), torch.zeros_like(v_TKD)
    meta = _kernel_meta(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, D,
                        softmax_scale)  # fmt: skip
    q, k, v = (pad_head_dim(x, D) for x in (q_THD, k_TKD, v_TKD))
    dout, out = pad_head_dim(dout_THD.to(q_THD.dtype), D), pad_head_dim(out_THD, D)
    dq, dk, dv = _flash_backward(dout, q, k, v, out, lse_for_kernel(lse_HT), *meta)
    return dq[..., :D], dk[..., :D], dv[..., :D]
