"""The `flash_attn` backend of `attn_varlen`: an adapter over flash-attn 2's varlen kernels.

Legend: T query tokens (documents packed), S key tokens, H query heads, K key/value heads
(H % K == 0; flash-attn takes GQA natively), D head dim, B documents.

GPU only (CUDA tensors, float16 / bfloat16, D <= 256). It calls flash-attn's varlen forward
and backward functions (`_flash_attn_varlen_forward` / `_flash_attn_varlen_backward`, the
ones its public `flash_attn_varlen_func` is built on) because our backward contract starts
from the forward's (out, lse): the public function would have to recompute the forward.
Their keyword names changed in flash-attn 2.7 (window_size -> window_size_left/right);
arguments are passed by name, filtered to what the installed version accepts.

Conversions to our contract:
- lse: flash-attn >= 2.4 returns the varlen lse as [H, T] float32, our layout already.
- A query that sees no key (Lq > Lk under causal, or Lk = 0): flash-attn writes lse +inf
  (its marker that makes p = exp(s - lse) vanish in the backward) and out 0; we return lse
  -inf and out 0, and hand +inf back to its backward.
- D not a multiple of 8: flash-attn needs it, so q, k, v (and dout, out) are zero-padded to
  the next multiple of 8, which changes no score, and the results are sliced back.
"""

import inspect
import math

import torch
import torch.nn.functional as F

__all__ = ["flash_attn_bwd", "flash_attn_fwd"]

_DTYPES = (torch.float16, torch.bfloat16)


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


def _check(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise ValueError(f"{name}: flash-attn needs CUDA tensors, got {q.device}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: flash-attn takes float16 or bfloat16, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"{name}: flash-attn supports head dim <= 256, got {q.shape[-1]}")


def _pad(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    padded = -(-head_dim // 8) * 8
    x = x if padded == head_dim else F.pad(x, (0, padded - head_dim))
    return x if x.stride(-1) == 1 else x.contiguous()


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def flash_attn_fwd(
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward on flash-attn (no autograd).

    q_THD [T, H, D], k_SKD / v_SKD [S, K, D]; cu_seqlens_* [B + 1] int; causal aligned
    bottom-right (flash-attn >= 2.1). Returns (out_THD [T, H, D] in q's dtype, lse_HT [H, T]
    float32; a query that sees no key has out 0 and lse -inf).
    """
    _check("flash_attn_fwd", q_THD, k_SKD, v_SKD)
    fa = _interface()
    D = q_THD.shape[-1]
    res = _call(
        fa._flash_attn_varlen_forward,
        _pad(q_THD, D), _pad(k_SKD, D), _pad(v_SKD, D),
        cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        int(max_seqlen_q), int(max_seqlen_k),
        dropout_p=0.0, softmax_scale=_scale(softmax_scale, D), causal=bool(causal),
        softcap=0.0, alibi_slopes=None, return_softmax=False, **_NO_WINDOW,
    )  # fmt: skip
    # flash-attn >= 2.7: (out, lse, S_dmask, rng_state); 2.6: (out, q, k, v, out_padded, lse, ...)
    out_pad, lse_HT = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
    if lse_HT.dim() != 2:
        raise RuntimeError(
            f"flash_attn_fwd: expected the varlen lse as [H, T] (flash-attn >= 2.4), got "
            f"{tuple(lse_HT.shape)}"
        )
    unseen_HT = ~torch.isfinite(lse_HT)  # +inf: the row saw no key
    lse_HT = lse_HT.masked_fill(unseen_HT, -math.inf)
    out_THD = out_pad[..., :D].masked_fill(unseen_HT.t()[..., None], 0)
    return out_THD, lse_HT


def flash_attn_bwd(
    dout_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_SKD: torch.Tensor,
    v_SKD: torch.Tensor,
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

    Shapes as `flash_attn_fwd`; dout_THD / out_THD [T, H, D], lse_HT [H, T] (ours: -inf for
    a row that saw no key). Returns (dq [T, H, D], dk [S, K, D], dv [S, K, D]).
    """
    _check("flash_attn_bwd", q_THD, k_SKD, v_SKD)
    fa = _interface()
    D = q_THD.shape[-1]
    q, k, v = (_pad(x, D) for x in (q_THD, k_SKD, v_SKD))
    dout, out = _pad(dout_THD.to(q_THD.dtype), D), _pad(out_THD, D)
    lse_fa = lse_HT.float().masked_fill(lse_HT == -math.inf, math.inf).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call(
        fa._flash_attn_varlen_backward,
        dout, q, k, v, out, lse_fa, dq, dk, dv,
        cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        int(max_seqlen_q), int(max_seqlen_k),
        dropout_p=0.0, softmax_scale=_scale(softmax_scale, D), causal=bool(causal),
        softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None, **_NO_WINDOW,
    )  # fmt: skip
    return dq[..., :D], dk[..., :D], dv[..., :D]
