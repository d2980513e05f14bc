"""Triton kernels of varlen flash attention, backward: preprocess (delta), dK/dV, dQ.

Legend (kernels/__init__.py): T tokens, N documents, Hq query heads, K key/value heads,
G = Hq / K, D head dim; added here: Lq / Lk one document's query / key count, BM / BN a block
of queries / keys, BD the head dim padded to a power of two.

Grids, bottom-right causal masking, natural-unit scores and int64 token offsets as in
`triton_attn_fwd_kernels.py`. P is recomputed from (q, k, lse); a row whose lse is -inf
(it saw no key) is given lse +inf here, so that its p is 0. dK/dV programs run over the key
blocks of one KV head and loop over its G query heads (dk/dv summed over the group); dQ
programs run over query blocks. All accumulation is float32.
"""

import triton
import triton.language as tl

from kernels._triton_utils import autotune_unless_interpreting
from kernels.attention.triton_attn_fwd_kernels import autotune_configs
from kernels.triton_dot import mma


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
        s = mma(q, kT, PRECISION) * softmax_scale
        valid = m_mask[:, None] & n_mask[None, :]
        if CAUSAL_MASK:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = mma(do, vT, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kT.dtype), tl.trans(kT), PRECISION)
    return dq


@autotune_unless_interpreting(autotune_configs([64, 128], [32, 64]), key=["BLOCK_D", "CAUSAL"])
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
        sT = mma(k, tl.trans(q), PRECISION) * softmax_scale
        valid = m_mask[None, :]
        if CAUSAL_MASK:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + shift)
        pT = tl.where(valid, tl.exp(sT - lse[None, :]), 0.0)
        dv += mma(pT.to(do.dtype), do, PRECISION)
        dpT = mma(v, tl.trans(do), PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += mma(dsT.to(q.dtype), q, PRECISION)
    return dk, dv


@autotune_unless_interpreting(autotune_configs([32, 64], [64, 128]), key=["BLOCK_D", "CAUSAL"])
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
