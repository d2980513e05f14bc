"""The argument rules every attention backend shares: checks and the softmax-scale default.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys), N documents, Hq query heads,
K key/value heads, D head dim.

`check_attn_args` is the one place the shape, GQA, dtype and cu_seqlens rules are written;
the public dispatch (`kernels.attention`) and every backend's fwd / bwd call it, each with
the dtypes and head dims it supports. It reads shapes, dtypes and devices only, so it runs on
the fake tensors of `torch.compile` and of the planner. `check_cu_seqlens_values` reads the
boundaries themselves and runs where that is free (CPU tensors, outside compilation).
"""

import math

import torch

from kernels.precision import FLOAT_DTYPES

__all__ = ["check_attn_args", "check_cu_seqlens_values", "default_softmax_scale"]


def default_softmax_scale(head_dim: int, softmax_scale: float | None) -> float:
    """`softmax_scale` as a float; 1 / sqrt(head_dim) when it is None."""
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def check_attn_args(
    name: str,
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    max_head_dim: int | None = None,
    dout_THD: torch.Tensor | None = None,
    out_THD: torch.Tensor | None = None,
    lse_HT: torch.Tensor | None = None,
) -> None:
    """Raise ValueError, naming `name` and the numbers, unless the arguments fit the contract.

    q_THD [Tq, Hq, D], k_TKD / v_TKD [Tk, K, D] with Hq % K == 0, one dtype among `dtypes`,
    one device; D <= `max_head_dim` when given; cu_seqlens_q / _k 1-D int32/int64 [N + 1],
    the same N. For a backward, dout_THD / out_THD [Tq, Hq, D] and lse_HT [Hq, Tq].
    """
    if q_THD.dim() != 3 or k_TKD.dim() != 3 or v_TKD.dim() != 3:
        raise ValueError(
            f"{name}: q, k, v must be [Tq, Hq, D], [Tk, K, D], [Tk, K, D]; got "
            f"{tuple(q_THD.shape)}, {tuple(k_TKD.shape)}, {tuple(v_TKD.shape)}"
        )
    Tq, Hq, D = q_THD.shape
    K = k_TKD.shape[1]
    if k_TKD.shape != v_TKD.shape or k_TKD.shape[2] != D:
        raise ValueError(
            f"{name}: k {tuple(k_TKD.shape)} and v {tuple(v_TKD.shape)} must match and share "
            f"q's head dim {D}"
        )
    if K == 0 or Hq % K:
        raise ValueError(f"{name}: query heads {Hq} must be a multiple of kv heads {K}")
    if max_head_dim is not None and q_THD.shape[2] > max_head_dim:
        raise ValueError(f"{name}: head dim {D} > {max_head_dim} is not supported")
    if k_TKD.dtype != q_THD.dtype or v_TKD.dtype != q_THD.dtype:
        raise ValueError(
            f"{name}: q, k, v dtypes differ: {q_THD.dtype}, {k_TKD.dtype}, {v_TKD.dtype}"
        )
    if q_THD.dtype not in dtypes:
        raise ValueError(
            f"{name}: dtype {q_THD.dtype} is not supported here "
            f"(supported: {', '.join(str(d) for d in dtypes)})"
        )
    if k_TKD.device != q_THD.device or v_TKD.device != q_THD.device:
        raise ValueError(
            f"{name}: q, k, v must be on one device, got {q_THD.device}, {k_TKD.device}, "
            f"{v_TKD.device}"
        )
    for label, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name}: {label} must be 1-D [N + 1], got shape {tuple(cu.shape)}")
        if cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: {label} must be int32 or int64, got {cu.dtype}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"{name}: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
            f"{tuple(cu_seqlens_k.shape)} must hold the same number of documents"
        )
    for label, x in (("dout", dout_THD), ("out", out_THD)):
        if x is not None and x.shape != q_THD.shape:
            raise ValueError(
                f"{name}: {label} {tuple(x.shape)} must have q's shape {tuple(q_THD.shape)}"
            )
    if lse_HT is not None and lse_HT.shape != (Hq, Tq):
        raise ValueError(f"{name}: lse must be [Hq, Tq] = {(Hq, Tq)}, got {tuple(lse_HT.shape)}")


def check_cu_seqlens_values(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    Tq: int,
    Tk: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    """Raise ValueError unless each cu_seqlens runs from 0 to its token count without going
    down, and no document is longer than its max_seqlen. Skipped where reading the values
    would sync a GPU or break a compiled graph."""
    if torch.compiler.is_compiling():
        return
    for label, cu, total, max_seqlen in (
        ("cu_seqlens_q", cu_seqlens_q, Tq, max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, Tk, max_seqlen_k),
    ):
        if cu.device.type != "cpu":
            continue
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(f"{label} must run from 0 to {total} (the token count), got {bounds}")
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{label} must be non-decreasing, got {bounds}")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(
                f"{label} has a document of {max(lengths)} tokens > max_seqlen {max_seqlen}"
            )
