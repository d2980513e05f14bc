"""Triton kernels of varlen flash attention: forward, backward preprocess, dK/dV, dQ.

Legend: T tokens (all documents packed), H query heads, K key/value heads, G = H / K query
heads per key/value head, D head dim, B documents, Lq / Lk one document's query / key count,
BM / BN a block of queries / keys, BD the head dim padded to a power of two.

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
(T * H * D passes 2^31 at a million tokens).
"""

import triton
import triton.language as tl

from kernels._triton_utils import autotune_unless_interpreting


def _configs(block_m: list[int], block_n: list[int]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_m
        for n in block_n
        for w, s in ((4, 2), (8, 3))
    ]


# ---------------------------------------------------------------------------------- forward


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
        s = tl.dot(q, kT, input_precision=PRECISION) * softmax_scale
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
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@autotune_unless_interpreting(_configs([64, 128], [32, 64]), key=["BLOCK_D", "CAUSAL"])
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


# --------------------------------------------------------------------------------- backward


@triton.jit
def attn_bwd_preprocess_kernel(
    o_ptr,
    do_ptr,
    dlse_ptr,
    delta_ptr,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    T_q,
    head_dim,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[h, t] = sum_d dout[t, h, d] * out[t, h, d] - dlse[h, t] (float32), all tokens.

    A gradient of the lse output (ring attention merges partials by lse) enters the backward
    only here: d lse_i / d s_ij = p_ij, so dS = P * (dP - delta + dlse)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < T_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(o_ptr + offs_t[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask)
    do = tl.load(
        do_ptr + offs_t[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + h.to(tl.int64) * T_q + offs_t, mask=offs_t < T_q, other=0.0)
    tl.store(delta_ptr + h.to(tl.int64) * T_q + offs_t, delta, mask=offs_t < T_q)


@triton.jit
def _load_row_stats(lse_row_ptr, delta_row_ptr, offs_m, m_mask):
    """lse (+inf where the row saw no key, so that its p is 0) and delta."""
    lse = tl.load(lse_row_ptr + offs_m, mask=m_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_row_ptr + offs_m, mask=m_mask, other=0.0)
    return lse, delta


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    lo,
    hi,
    offs_m,
    m_mask,
    offs_d,
    d_mask,
    Lk,
    shift,
    softmax_scale,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq[BM, D] += dS @ K over the key blocks starting in [lo, hi) (dS unscaled)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < Lk
        kv_mask = d_mask[:, None] & n_mask[None, :]
        kT = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
            mask=kv_mask,
            other=0.0,
        )
        vT = tl.load(
            v_base + offs_n[None, :].to(tl.int64) * stride_vt + offs_d[:, None],
            mask=kv_mask,
            other=0.0,
        )
        s = tl.dot(q, kT, input_precision=PRECISION) * softmax_scale
        valid = m_mask[:, None] & n_mask[None, :]
        if CAUSAL_MASK:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@autotune_unless_interpreting(_configs([64, 128], [32, 64]), key=["BLOCK_D", "CAUSAL"])
@triton.jit
def attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    cu_q_ptr,
    cu_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
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
    """dq[BM, D] of one query block of one head: the same key loop as the forward."""
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
    md_mask = m_mask[:, None] & d_mask[None, :]
    rows = (q_start + offs_m.to(tl.int64))[:, None]
    q = tl.load(q_ptr + rows * stride_qt + h * stride_qh + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(
        do_ptr + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=md_mask, other=0.0
    )
    row_off = h.to(tl.int64) * T_q + q_start
    lse, delta = _load_row_stats(lse_ptr + row_off, delta_ptr + row_off, offs_m, m_mask)
    k_base = k_ptr + k_start * stride_kt + hk * stride_kh
    v_base = v_ptr + k_start * stride_vt + hk * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + shift, 0), Lk)
        full_hi = tl.minimum(tl.maximum((m0 + shift + 1) // BLOCK_N * BLOCK_N, 0), hi)
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, full_hi,
            offs_m, m_mask, offs_d, d_mask, Lk, shift, softmax_scale, BLOCK_N, False, PRECISION,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, full_hi, hi,
            offs_m, m_mask, offs_d, d_mask, Lk, shift, softmax_scale, BLOCK_N, True, PRECISION,
        )  # fmt: skip
    else:
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, Lk,
            offs_m, m_mask, offs_d, d_mask, Lk, shift, softmax_scale, BLOCK_N, False, PRECISION,
        )  # fmt: skip
    dq = dq * softmax_scale
    tl.store(
        dq_ptr + rows * stride_dqt + h * stride_dqh + offs_d[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=md_mask,
    )


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_row_ptr,
    delta_row_ptr,
    stride_qt,
    stride_dot,
    lo,
    hi,
    offs_n,
    offs_d,
    d_mask,
    Lq,
    shift,
    softmax_scale,
    BLOCK_M: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dv[BN, D] += P^T dO and dk[BN, D] += dS^T Q over the query blocks in [lo, hi)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Lq
        md_mask = m_mask[:, None] & d_mask[None, :]
        rows = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + rows * stride_qt + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_base + rows * stride_dot + offs_d[None, :], mask=md_mask, other=0.0)
        lse, delta = _load_row_stats(lse_row_ptr, delta_row_ptr, offs_m, m_mask)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * softmax_scale
        valid = m_mask[None, :]
        if CAUSAL_MASK:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + shift)
        pT = tl.where(valid, tl.exp(sT - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@autotune_unless_interpreting(_configs([32, 64], [64, 128]), key=["BLOCK_D", "CAUSAL"])
@triton.jit
def attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    cu_q_ptr,
    cu_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
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
    """dk, dv [BN, D] of one key block of one KV head, summed over the G query heads of its
    group inside the program (no atomics, KV never repeated)."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    k_start = tl.load(cu_k_ptr + b).to(tl.int64)
    Lk = (tl.load(cu_k_ptr + b + 1) - k_start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= Lk:
        return
    q_start = tl.load(cu_q_ptr + b).to(tl.int64)
    Lq = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
    shift = Lk - Lq

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nd_mask = (offs_n < Lk)[:, None] & (offs_d < head_dim)[None, :]
    d_mask = offs_d < head_dim
    keys = (k_start + offs_n.to(tl.int64))[:, None]
    k = tl.load(
        k_ptr + keys * stride_kt + hk * stride_kh + offs_d[None, :], mask=nd_mask, other=0.0
    )
    v = tl.load(
        v_ptr + keys * stride_vt + hk * stride_vh + offs_d[None, :], mask=nd_mask, other=0.0
    )

    if CAUSAL:
        # Rows that see key n0: i >= n0 - shift; rows that see the whole block: i >= n0 + BN - 1
        # - shift. Query blocks start on multiples of BM from the first of those.
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(n0 + BLOCK_N - 1 - shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), tl.maximum(Lq, lo))
    else:
        lo = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        h = hk * group + g
        q_base = q_ptr + q_start * stride_qt + h * stride_qh
        do_base = do_ptr + q_start * stride_dot + h * stride_doh
        row_off = h.to(tl.int64) * T_q + q_start
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_ptr + row_off, delta_ptr + row_off,
            stride_qt, stride_dot, lo, mid, offs_n, offs_d, d_mask, Lq, shift, softmax_scale,
            BLOCK_M, True, PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_ptr + row_off, delta_ptr + row_off,
            stride_qt, stride_dot, mid, Lq, offs_n, offs_d, d_mask, Lq, shift, softmax_scale,
            BLOCK_M, False, PRECISION,
        )  # fmt: skip
    dk = dk * softmax_scale
    tl.store(
        dk_ptr + keys * stride_dkt + hk * stride_dkh + offs_d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=nd_mask,
    )
    tl.store(
        dv_ptr + keys * stride_dvt + hk * stride_dvh + offs_d[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=nd_mask,
    )
