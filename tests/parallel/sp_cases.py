"""Shared pieces of the distributed SP tests: a packed float64 batch, its single-process
reference, and one SP run of it. Runs inside `tests.spawn.spawn` workers.

Legend: T tokens of the batch, Hq query heads, K KV heads, D head dim, U Ulysses and R ring
degrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention import attn_varlen
from parallel import CommStats, ParallelDims, shard_packed, usp_attn_varlen_func, usp_cost
from tests.helpers import cu_seqlens

# Odd lengths on purpose; the 30-token document is longer than a whole shard at P = 4
# (61 / 4 ~ 15 tokens) and than a ring rank's share at P = 2; the 1-token document is
# shorter than one zigzag chunk.
DOC_LENGTHS = (13, 1, 30, 17)
HEAD_DIM = 6


@dataclass
class Config:
    """The `parallel` config group as the trainer's dataclass has it."""

    method: str
    ulysses: int = 1
    ring: int = 1
    ring_impl: str = "zigzag"


def make_batch(num_heads: int, num_kv_heads: int, seed: int = 0):
    """(cu_seqlens, q, k, v, dout), identical on every rank (seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(DOC_LENGTHS)
    cu = cu_seqlens(DOC_LENGTHS)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = (
        rand(T, num_heads, HEAD_DIM),
        rand(T, num_kv_heads, HEAD_DIM),
        rand(T, num_kv_heads, HEAD_DIM),
    )
    return cu, q, k, v, rand(T, num_heads, HEAD_DIM)


def reference(cu, q, k, v, dout, causal: bool):
    """Single-process attn_varlen: out, lse, dq, dk, dv."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    longest = int((cu[1:] - cu[:-1]).max())
    out, lse = attn_varlen(q, k, v, cu, cu, longest, longest, causal, None, "torch")
    (out * dout).sum().backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp(min=1e-300)
    return float((got.detach() - want).abs().max() / scale) if got.numel() else 0.0


def run_sp_case(dims: ParallelDims, cfg: Config, num_heads, num_kv_heads, causal) -> dict:
    """Run one SP forward/backward on this rank and compare it with the reference.

    Returns relative errors (real tokens), exactness checks on padding, the collective
    counts and bytes of the forward and the backward, and their analytic values.
    """
    cu, q, k, v, dout = make_batch(num_heads, num_kv_heads)
    ref = reference(cu, q, k, v, dout, causal)
    layout = shard_packed(cu, q.shape[0], dims, cfg)
    idx = layout.local_index_T
    real = idx >= 0
    q_l, k_l, v_l = (layout.take(x, 0.0).requires_grad_() for x in (q, k, v))
    dout_l = layout.take(dout, 0.0)
    groups = (dims.ulysses_group, dims.ring_group)
    stats = CommStats()
    out_l, _ = usp_attn_varlen_func(
        *groups, q_l, k_l, v_l, layout.attn_meta, causal, None, "torch", cfg.ring_impl, stats
    )
    fwd_calls, fwd_bytes = dict(stats.calls), stats.bytes_sent
    fwd_recv = stats.bytes_received
    stats.reset()
    (out_l * dout_l).sum().backward()
    bwd_calls, bwd_bytes = dict(stats.calls), stats.bytes_sent
    with torch.no_grad():  # lse needs one more all-to-all under Ulysses: a separate call
        _, lse_l = usp_attn_varlen_func(
            *groups,
            q_l,
            k_l,
            v_l,
            layout.attn_meta,
            causal,
            None,
            "torch",
            cfg.ring_impl,
            None,
            return_lse=True,
        )
    cost = usp_cost(
        layout.attn_meta.layout.local_tokens,
        num_heads,
        num_kv_heads,
        HEAD_DIM,
        dims.ulysses,
        dims.ring,
        torch.float64,
        cfg.ring_impl,
    )
    ri = idx[real]
    return {
        "out": rel_err(out_l[real], ref["out"][ri]),
        "lse": rel_err(lse_l[:, real], ref["lse"][:, ri]),
        "dq": rel_err(q_l.grad[real], ref["dq"][ri]),
        "dk": rel_err(k_l.grad[real], ref["dk"][ri]),
        "dv": rel_err(v_l.grad[real], ref["dv"][ri]),
        "pad_out_finite": bool(torch.isfinite(out_l[~real]).all()),
        "pad_grads_zero": all(bool((x.grad[~real] == 0).all()) for x in (q_l, k_l, v_l)),
        "num_padding": layout.num_padding,
        "fwd_calls": fwd_calls,
        "bwd_calls": bwd_calls,
        "fwd_bytes": fwd_bytes,
        "fwd_recv": fwd_recv,
        "bwd_bytes": bwd_bytes,
        "want_fwd_calls": cost.fwd_calls,
        "want_bwd_calls": cost.bwd_calls,
        "want_fwd_bytes": cost.fwd_bytes,
        "want_bwd_bytes": cost.bwd_bytes,
    }
