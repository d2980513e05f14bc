"""The `flash_attn` backend of `attn_varlen`: an adapter over flash-attn 2's varlen kernels.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys; documents packed), N documents,
Hq query heads, K key/value heads (Hq % K == 0; flash-attn takes GQA natively), D head dim.

GPU only (CUDA tensors, float16 / bfloat16, D <= 256). It calls flash-attn's varlen forward
and backward functions (`_flash_attn_varlen_forward` / `_flash_attn_varlen_backward`, the
ones its public `flash_attn_varlen_func` is built on) because our backward contract starts
from the forward's (out, lse): the public function would have to recompute the forward.
Their keyword names changed in flash-attn 2.7 (window_size -> window_size_left/right);
arguments are passed by name, filtered to what the installed version accepts.

flash-attn >= 2.4 returns the varlen lse as [Hq, Tq] float32, our layout already. The
other conversions to our contract (lse +inf of rows that see no key, head dims padded to a
multiple of 8) are `flash_conventions`, shared with torch's copy of these kernels.
"""

import inspect

import torch

from kernels.attention.args import check_attn_args, default_softmax_scale
from kernels.attention.flash_conventions import (
    FLASH_DTYPES,
    MAX_HEAD_DIM,
    lse_for_kernel,
    pad_head_dim,
    results_to_contract,
)

__all__ = ["flash_attn_bwd", "flash_attn_fwd"]


def _interface():
    try:
        from flash_attn import flash_attn_interface
    except ImportError as e:
        raise ImportError(f"the flash_attn backend needs the flash-attn package: {e}") from e
    return flash_attn_interface


def _call(fn, *args, **kwargs):
    """Call `fn` with only the keyword arguments its signature (this version) accepts."""
    target = getattr(fn, "_init_fn", fn)  # torch.library custom ops keep the Python function
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        if "window_size" in params:
            kwargs["window_size"] = (-1, -1)
    return fn(*args, **kwargs)


_NO_WINDOW = dict(window_size_left=-1, window_size_right=-1)


def _check_cuda(name: str, *tensors: torch.Tensor) -> None:
    if not all(t.is_cuda for t in tensors):
        raise ValueError(f"{name}: flash-attn needs CUDA tensors, got {tensors[0].device}")


def flash_attn_fwd(
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
    """Varlen attention forward on flash-attn (no autograd).

    q_THD [Tq, Hq, D], k_TKD / v_TKD [Tk, K, D] (float16 / bfloat16, D <= 256, CUDA);
    cu_seqlens_* [N + 1] int; causal aligned bottom-right (flash-attn >= 2.1).
    Returns (out_THD [Tq, Hq, D] in q's dtype, lse_HT [Hq, Tq] float32; a query that sees no
    key has out 0 and lse -inf).
    """
    check_attn_args(
        "flash_attn_fwd", q_THD, k_TKD, v_TKD, cu_seqlens_q, cu_seqlens_k, dtypes=FLASH_DTYPES,
        max_head_dim=MAX_HEAD_DIM,
    )  # fmt: skip
    _check_cuda("flash_attn_fwd", q_THD, k_TKD, v_TKD)
    fa = _interface()
    D = q_THD.shape[-1]
    res = _call(
        fa._flash_attn_varlen_forward,
        pad_head_dim(q_THD, D), pad_head_dim(k_TKD, D), pad_head_dim(v_TKD, D),
        cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        int(max_seqlen_q), int(max_seqlen_k),
        dropout_p=0.0, softmax_scale=default_softmax_scale(D, softmax_scale), causal=bool(causal),
        softcap=0.0, alibi_slopes=None, return_softmax=False, **_NO_WINDOW,
    )  # fmt: skip
    # flash-attn >= 2.7: (out, lse, S_dmask, rng_state); 2.6: (out, q, k, v, out_padded, lse, ...)
    out_pad, lse_HT = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
    if lse_HT.dim() != 2:
        raise RuntimeError(
            f"flash_attn_fwd: expected the varlen lse as [Hq, Tq] (flash-attn >= 2.4), got "
            f"{tuple(lse_HT.shape)}"
        )
    return results_to_contract(out_pad, lse_HT, D)


def flash_attn_bwd(
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
    """Varlen attention backward on flash-attn (no autograd), from the forward's (out, lse).

    Shapes as `flash_attn_fwd`; dout_THD / out_THD [Tq, Hq, D], lse_HT [Hq, Tq] (ours: -inf for
    a row that saw no key). Returns (dq [Tq, Hq, D], dk [Tk, K, D], dv [Tk, K, D]).
    """
    check_attn_args(
        "flash_attn_bwd", q_THD, k_TKD, v_TKD, cu_seqlens_q, cu_seqlens_k, dtypes=FLASH_DTYPES,
        max_head_dim=MAX_HEAD_DIM, dout_THD=dout_THD, out_THD=out_THD, lse_HT=lse_HT,
    )  # fmt: skip
    _check_cuda("flash_attn_bwd", q_THD, k_TKD, v_TKD)
    fa = _interface()
    D = q_THD.shape[-1]
    q, k, v = (pad_head_dim(x, D) for x in (q_THD, k_TKD, v_TKD))
    dout, out = pad_head_dim(dout_THD.to(q_THD.dtype), D), pad_head_dim(out_THD, D)
    lse_fa = lse_for_kernel(lse_HT)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call(
        fa._flash_attn_varlen_backward,
        dout, q, k, v, out, lse_fa, dq, dk, dv,
        cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        int(max_seqlen_q), int(max_seqlen_k),
        dropout_p=0.0, softmax_scale=default_softmax_scale(D, softmax_scale), causal=bool(causal),
        softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None, **_NO_WINDOW,
    )  # fmt: skip
    return dq[..., :D], dk[..., :D], dv[..., :D]
