"""Triton kernels of varlen flash attention, forward; the backward's are in
`triton_attn_bwd_kernels.py`, and what this docstring says holds for both.

Legend (kernels/__init__.py): T tokens (all documents packed), N documents, Hq query heads,
K key/value heads, G = Hq / K query heads per key/value head, D head dim; added here:
Lq / Lk one document's query / key count, BM / BN a block of queries / keys, BD the head dim
padded to a power of two.

Grids are (blocks of one document, heads, documents): a program never crosses a document
boundary, and blocks past a document's end return at once. Causal masking is bottom-right
aligned: query i sees key j iff j <= i + shift with shift = Lk - Lq. Key (query) blocks that
no query (key) of the program's block can see are never visited; of those visited, only the
ones straddling the diagonal compute the causal mask (`CAUSAL_MASK`).

Scores stay in natural units, s = (q . k) * softmax_scale, and exponentials are exp(s - m):
the subtraction comes before any rescaling (on GPUs tl.exp is exp2 of (s - m) * log2(e), one
multiply more per score than FA2's base-2 scores). In base 2 the lse is rounded at a larger
magnitude twice (s * log2(e), then * ln 2): measured on a float32 test case, lse error 6.6e-7
against float64 versus 4.7e-7 now, the same as a float32 torch logsumexp; the backward, which
recomputes p from lse, is sensitive to that rounding. A row that sees no key keeps running
max -inf and sum 0, and is written as out 0, lse -inf; the backward turns lse -inf into
+inf, so its p is 0.
All accumulation is float32. Token offsets are widened to int64 before they meet a stride
(T * Hq * D passes 2^31 at a million tokens).
"""

import triton
import triton.language as tl

from kernels._triton_utils import autotune_unless_interpreting
from kernels.triton_dot import mma


def autotune_configs(block_m: list[int], block_n: list[int]) -> list[triton.Config]:
    """BLOCK_M x BLOCK_N, each with (num_warps, num_stages) of (4, 2) and (8, 3)."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_m
        for n in block_n
        for w, s in ((4, 2), (8, 3))
    ]


@triton.jit
def _fwd_inner(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    lo,
    hi,
    offs_m,
    offs_d,
    d_mask,
    Lk,
    shift,
    softmax_scale,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over the key blocks starting in [lo, hi) of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Lk
        kv_mask = d_mask[:, None] & n_mask[None, :]
        kT = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
            mask=kv_mask,
            other=0.0,
        )
        s = mma(q, kT, PRECISION) * softmax_scale
        valid = n_mask[None, :]
        if CAUSAL_MASK:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet has max -inf: shift by 0 so exp gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@autotune_unless_interpreting(autotune_configs([64, 128], [32, 64]), key=["BLOCK_D", "CAUSAL"])
@triton.jit
def attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cu_q_ptr,
    cu_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    T_q,
    head_dim,
    group,
    softmax_scale,
    CAUSAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[BM, D] and lse[BM] of one query block of one head of one document."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b).to(tl.int64)
    Lq = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    k_start = tl.load(cu_k_ptr + b).to(tl.int64)
    Lk = (tl.load(cu_k_ptr + b + 1) - k_start).to(tl.int32)
    shift = Lk - Lq
    hk = h // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < head_dim
    rows = (q_start + offs_m.to(tl.int64))[:, None]
    q = tl.load(
        q_ptr + rows * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_base = k_ptr + k_start * stride_kt + hk * stride_kh
    v_base = v_ptr + k_start * stride_vt + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        # Keys any row of the block sees: j < m0 + BM + shift. Keys every row sees: whole
        # blocks ending at or before m0 + shift; only the blocks in between need the mask.
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + shift, 0), Lk)
        full_hi = tl.minimum(tl.maximum((m0 + shift + 1) // BLOCK_N * BLOCK_N, 0), hi)
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, 0, full_hi,
            offs_m, offs_d, d_mask, Lk, shift, softmax_scale, BLOCK_N, False, PRECISION,
        )  # fmt: skip
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, full_hi, hi,
            offs_m, offs_d, d_mask, Lk, shift, softmax_scale, BLOCK_N, True, PRECISION,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _fwd_inner(
            acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, 0, Lk,
            offs_m, offs_d, d_mask, Lk, shift, softmax_scale, BLOCK_N, False, PRECISION,
        )  # fmt: skip

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.log(l_safe), float("-inf"))
    tl.store(
        o_ptr + rows * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + h.to(tl.int64) * T_q + q_start + offs_m, lse, mask=m_mask)
