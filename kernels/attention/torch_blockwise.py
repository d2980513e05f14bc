"""The `torch` attention backend: variable-length causal/full attention with LSE, no autograd.

Legend (kernels/__init__.py): T tokens (Tq queries, Tk keys; documents packed), N documents
(also: the N pieces of documents batched into one op call), Hq query heads, K key/value heads,
G = Hq / K, D head dim; added here: L one document's (piece's) length, and in the blockwise
path Q queries and C keys of one tile, M = G x Q rows (a KV head's G query heads stacked).

Two paths, one contract (see docs/INTERFACES.md):
- CPU tensors: the CPU flash-attention op (aten `_scaled_dot_product_flash_attention_for_cpu`
  and its backward), called per document, with documents of equal shape batched into one call.
  The op tiles internally (memory O(L x block), not O(L^2)), takes GQA natively and returns
  dk/dv in the KV-head shape. It aligns causal masks top-left, so each document is cut into
  pieces where alignment agrees: with Lq < Lk, the first Lk - Lq keys are seen by every query
  (a full call) and the last Lq keys form a square causal block; the two partials merge by LSE.
  With Lq > Lk the first Lq - Lk queries see nothing (out 0, lse -inf) and the rest form a
  square causal block. The backward of each piece takes the merged (out, lse), so the pieces'
  dq add up and their dk/dv are disjoint.
- Other devices (or on request): plain blockwise math with an online softmax over tiles of
  `block_q` queries x `block_k` keys, all heads batched, GQA by viewing the G query heads of a
  KV head as extra rows (KV is never repeated). Each query sees one contiguous key interval
  [klo, khi) (its document, cut causally), which is the whole mask. A query tile spans the
  key range of all its queries, so a tile that straddles a document boundary also computes
  (masked) scores against the earlier document: at most one extra tile row per boundary.

float32 and bfloat16/float16 inputs accumulate in float32 and return lse in float32; float64
runs in float64 throughout. Outputs are allocated NaN-filled and every row is written, so a
missed row shows up in tests.
"""

import torch

from kernels.attention.args import check_attn_args, default_softmax_scale
from kernels.attention.merge import merge_attn_partials
from kernels.precision import acc_dtype

_CPU_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def _use_cpu_flash(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and _CPU_FLASH_FWD is not None and _CPU_FLASH_BWD is not None


# ----------------------------------------------------------------------------------------------
# CPU path: per-document calls of the CPU flash op
# ----------------------------------------------------------------------------------------------


class _Plan:
    """How the documents map onto calls of the CPU op (pure integer bookkeeping).

    no_key_q: query ranges that see no key; unseen_k: key ranges no query sees;
    main[(Lq, Lk, causal)]: (q0, k0) starts of pieces whose result is written directly;
    prefix[(Lq, Lk)]: (q0, k0) starts of full pieces merged into an existing main result.
    """

    def __init__(self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool):
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        self.no_key_q: list[tuple[int, int]] = []
        self.unseen_k: list[tuple[int, int]] = []
        self.main: dict[tuple[int, int, bool], list[tuple[int, int]]] = {}
        self.prefix: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for b in range(len(bq) - 1):
            q0, k0, lq, lk = bq[b], bk[b], bq[b + 1] - bq[b], bk[b + 1] - bk[b]
            if lq == 0:
                if lk > 0:
                    self.unseen_k.append((k0, k0 + lk))
            elif lk == 0:
                self.no_key_q.append((q0, q0 + lq))
            elif not causal or lq == lk:
                self.main.setdefault((lq, lk, causal), []).append((q0, k0))
            elif lq > lk:  # the first lq - lk queries see no key; the rest are a causal square
                self.no_key_q.append((q0, q0 + lq - lk))
                self.main.setdefault((lk, lk, True), []).append((q0 + lq - lk, k0))
            else:  # lq < lk: a causal square over the last lq keys, plus a full prefix
                self.main.setdefault((lq, lq, True), []).append((q0, k0 + lk - lq))
                self.prefix.setdefault((lq, lk - lq), []).append((q0, k0))


def _rows(starts: list[int], length: int, device: torch.device) -> slice | torch.Tensor:
    """Rows of N pieces of `length` starting at `starts`: a slice for one piece (views, no
    copy), else an index tensor [N * L]."""
    if len(starts) == 1:
        return slice(starts[0], starts[0] + length)
    start_N1 = torch.tensor(starts, device=device)[:, None]
    return (start_N1 + torch.arange(length, device=device)[None, :]).reshape(-1)


def _to_op(x_THD: torch.Tensor, rows: slice | torch.Tensor, n: int) -> torch.Tensor:
    """[T, H, D] rows of N pieces -> [N, H, L, D], the op's layout."""
    return x_THD[rows].view(n, -1, *x_THD.shape[1:]).transpose(1, 2)


def _from_op(x_NHLD: torch.Tensor) -> torch.Tensor:
    """[N, H, L, D] -> [N * L, H, D]."""
    return x_NHLD.transpose(1, 2).reshape(-1, *x_NHLD.shape[1:2], x_NHLD.shape[-1])


def _lse_to_op(lse_HT: torch.Tensor, rows: slice | torch.Tensor, n: int) -> torch.Tensor:
    """[Hq, T] rows of N pieces -> [N, Hq, L]."""
    return lse_HT[:, rows].view(lse_HT.shape[0], n, -1).transpose(0, 1)


def _lse_from_op(lse_NHL: torch.Tensor) -> torch.Tensor:
    """[N, Hq, L] -> [Hq, N * L]."""
    return lse_NHL.transpose(0, 1).reshape(lse_NHL.shape[1], -1)


def _one_call(plan: _Plan, T: int, Tk: int):
    """The (Lq, Lk, causal) of the single op call covering every query and key row in order
    (one document, or equal documents), else None; then the op's outputs are the results."""
    if plan.no_key_q or plan.unseen_k or plan.prefix or len(plan.main) != 1:
        return None
    ((lq, lk, piece_causal), starts), *_ = plan.main.items()
    in_order = all(q0 == i * lq and k0 == i * lk for i, (q0, k0) in enumerate(starts))
    return (lq, lk, piece_causal) if in_order and len(starts) * lq == T else None


def _cpu_flash_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale):
    plan = _Plan(cu_seqlens_q, cu_seqlens_k, causal)
    Hq, T = q.shape[1], q.shape[0]
    if one := _one_call(plan, T, k.shape[0]):  # no output copy: [N, Hq, L, D] is [T, Hq, D]
        n = T // one[0]
        q_, k_, v_ = (x.view(n, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        o_NHLD, lse_NHL = _CPU_FLASH_FWD(q_, k_, v_, 0.0, one[2], scale=scale)
        return _from_op(o_NHLD), _lse_from_op(lse_NHL)
    out_THD = torch.full_like(q, float("nan"))
    lse_HT = q.new_full((Hq, T), float("nan"), dtype=acc_dtype(q.dtype))
    for q0, q1 in plan.no_key_q:
        out_THD[q0:q1] = 0
        lse_HT[:, q0:q1] = float("-inf")
    for (lq, lk, piece_causal), starts in plan.main.items():
        q_starts, k_starts = zip(*starts)
        rq, rk, n = _rows(q_starts, lq, q.device), _rows(k_starts, lk, q.device), len(starts)
        o_NHLD, lse_NHL = _CPU_FLASH_FWD(
            _to_op(q, rq, n), _to_op(k, rk, n), _to_op(v, rk, n), 0.0, piece_causal, scale=scale
        )
        out_THD[rq] = _from_op(o_NHLD)
        lse_HT[:, rq] = _lse_from_op(lse_NHL)
    for (lq, lk), starts in plan.prefix.items():
        q_starts, k_starts = zip(*starts)
        rq, rk, n = _rows(q_starts, lq, q.device), _rows(k_starts, lk, q.device), len(starts)
        o_NHLD, lse_NHL = _CPU_FLASH_FWD(
            _to_op(q, rq, n), _to_op(k, rk, n), _to_op(v, rk, n), 0.0, False, scale=scale
        )
        out_THD[rq], lse_HT[:, rq] = merge_attn_partials(
            out_THD[rq], lse_HT[:, rq], _from_op(o_NHLD), _lse_from_op(lse_NHL)
        )
    return out_THD, lse_HT


def _cpu_flash_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale):
    plan = _Plan(cu_seqlens_q, cu_seqlens_k, causal)
    lse = lse.to(acc_dtype(q.dtype))
    if one := _one_call(plan, q.shape[0], k.shape[0]):  # no gradient copies
        n = q.shape[0] // one[0]
        ops = (x.view(n, -1, *x.shape[1:]).transpose(1, 2) for x in (dout, q, k, v, out))
        lse_NHL = lse.view(lse.shape[0], n, -1).transpose(0, 1)
        grads = _CPU_FLASH_BWD(*ops, lse_NHL, 0.0, one[2], scale=scale)
        return tuple(_from_op(g) for g in grads)
    dq_THD = torch.full_like(q, float("nan"))
    dk_TKD, dv_TKD = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    for q0, q1 in plan.no_key_q:
        dq_THD[q0:q1] = 0
    for k0, k1 in plan.unseen_k:
        dk_TKD[k0:k1] = 0
        dv_TKD[k0:k1] = 0
    pieces = [(key, starts, False) for key, starts in plan.main.items()]
    pieces += [((lq, lk, False), starts, True) for (lq, lk), starts in plan.prefix.items()]
    for (lq, lk, piece_causal), starts, is_prefix in pieces:
        q_starts, k_starts = zip(*starts)
        rq, rk, n = _rows(q_starts, lq, q.device), _rows(k_starts, lk, q.device), len(starts)
        dq_NHLD, dk_NKLD, dv_NKLD = _CPU_FLASH_BWD(
            _to_op(dout, rq, n),
            _to_op(q, rq, n),
            _to_op(k, rk, n),
            _to_op(v, rk, n),
            _to_op(out, rq, n),
            _lse_to_op(lse, rq, n),
            0.0,
            piece_causal,
            scale=scale,
        )
        if is_prefix:  # the main piece already wrote these rows of dq: add in fp32/fp64
            dq_sum = dq_THD[rq].to(lse.dtype) + _from_op(dq_NHLD).to(lse.dtype)
            dq_THD[rq] = dq_sum.to(q.dtype)
        else:
            dq_THD[rq] = _from_op(dq_NHLD)
        dk_TKD[rk] = _from_op(dk_NKLD)
        dv_TKD[rk] = _from_op(dv_NKLD)
    return dq_THD, dk_TKD, dv_TKD


# ----------------------------------------------------------------------------------------------
# Blockwise path: online softmax over (block_q x block_k) tiles, any device
# ----------------------------------------------------------------------------------------------


def _key_intervals(cu_seqlens_q, cu_seqlens_k, causal, T, device):
    """Each query's visible keys as [klo_T, khi_T) (int64 [T]); empty when khi <= klo."""
    cu_q, cu_k = cu_seqlens_q.to(device, torch.int64), cu_seqlens_k.to(device, torch.int64)
    len_q_N, len_k_N = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    doc_T = torch.repeat_interleave(torch.arange(len_q_N.numel(), device=device), len_q_N)
    klo_T = cu_k[:-1][doc_T]
    if causal:  # query i of Lq sees keys j <= i + (Lk - Lq) of its document
        pos_T = torch.arange(T, device=device) - cu_q[:-1][doc_T]
        seen_T = torch.minimum(
            (pos_T + len_k_N[doc_T] - len_q_N[doc_T] + 1).clamp(min=0), len_k_N[doc_T]
        )
    else:
        seen_T = len_k_N[doc_T]
    return klo_T, klo_T + seen_T


def _block_key_ranges(klo_T, khi_T, block_q, Tk):
    """Per query block, the key range [lo, hi) covering all its queries; one host sync."""
    T = klo_T.numel()
    nb = -(-T // block_q)
    pad = nb * block_q - T
    lo_nb = torch.cat([klo_T, klo_T.new_full((pad,), Tk)]).view(nb, block_q).amin(dim=1)
    hi_nb = torch.cat([khi_T, khi_T.new_zeros(pad)]).view(nb, block_q).amax(dim=1)
    return torch.stack([lo_nb, hi_nb], dim=1).tolist()


def _heads_as_rows(x_LHD: torch.Tensor, K: int, cd: torch.dtype) -> torch.Tensor:
    """[L, Hq, D] -> [K, G * L, D] (query head h = kv_head * G + g), in compute dtype `cd`."""
    L, Hq, D = x_LHD.shape
    return x_LHD.to(cd).reshape(L, K, Hq // K, D).permute(1, 2, 0, 3).reshape(K, -1, D)


def _rows_as_heads(x_KMD: torch.Tensor, L: int) -> torch.Tensor:
    """[K, G * L, D] -> [L, Hq, D]."""
    K, M, D = x_KMD.shape
    return x_KMD.view(K, M // L, L, D).permute(2, 0, 1, 3).reshape(L, -1, D)


def _masked_scores(q_KMD, k_TKD, klo_T, khi_T, q0, q1, k0, k1, scale):
    """Scaled scores [K, M, C] of queries q0:q1 (Q of them) vs keys k0:k1 (C), -inf where not
    visible."""
    K, M, _ = q_KMD.shape
    s_KMC = torch.bmm(q_KMD, k_TKD[k0:k1].to(q_KMD.dtype).permute(1, 2, 0)) * scale
    j_1C = torch.arange(k0, k1, device=q_KMD.device)[None, :]
    hidden_QC = (j_1C < klo_T[q0:q1, None]) | (j_1C >= khi_T[q0:q1, None])
    return s_KMC.view(K, -1, q1 - q0, k1 - k0).masked_fill(hidden_QC, float("-inf")).view(K, M, -1)


@torch.no_grad()
def blockwise_attn_fwd(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal=True,
    softmax_scale=None,
    block_q: int = 128,
    block_k: int = 512,
):
    """Blockwise forward; arguments as `torch_attn_fwd` plus tile sizes (queries, keys).

    Memory: O(T * Hq * D) plus one [K, G * block_q, block_k] tile. Returns (out_THD, lse_HT).
    """
    T, Hq, D = q.shape
    Tk, K, _ = k.shape
    cd, scale = acc_dtype(q.dtype), default_softmax_scale(D, softmax_scale)
    klo_T, khi_T = _key_intervals(cu_seqlens_q, cu_seqlens_k, causal, T, q.device)
    out_THD = torch.full_like(q, float("nan"))
    lse_HT = q.new_full((Hq, T), float("nan"), dtype=cd)
    for b, (lo, hi) in enumerate(_block_key_ranges(klo_T, khi_T, block_q, Tk)):
        q0, q1 = b * block_q, min(T, (b + 1) * block_q)
        q_KMD = _heads_as_rows(q[q0:q1], K, cd)
        m_KM = q_KMD.new_full(q_KMD.shape[:2], float("-inf"))
        l_KM = torch.zeros_like(m_KM)
        acc_KMD = torch.zeros_like(q_KMD)
        for k0 in range(lo, hi, block_k):
            k1 = min(hi, k0 + block_k)
            s_KMC = _masked_scores(q_KMD, k, klo_T, khi_T, q0, q1, k0, k1, scale)
            m_new_KM = torch.maximum(m_KM, s_KMC.amax(dim=-1))
            # A row that has seen no key yet keeps max -inf; shift it by 0 so exp gives 0.
            m_safe_KM = torch.where(torch.isfinite(m_new_KM), m_new_KM, 0.0)
            p_KMC = torch.exp(s_KMC - m_safe_KM[..., None])
            # Rescale what was summed so far; 0 (not inf * 0) while the old max is -inf.
            alpha_KM = torch.exp(m_KM - m_safe_KM)
            l_KM = l_KM * alpha_KM + p_KMC.sum(dim=-1)
            acc_KMD = acc_KMD * alpha_KM[..., None] + torch.bmm(
                p_KMC, v[k0:k1].to(cd).transpose(0, 1)
            )
            m_KM = m_new_KM
        seen_KM = l_KM > 0
        l_safe_KM = torch.where(seen_KM, l_KM, 1.0)
        out_THD[q0:q1] = _rows_as_heads(acc_KMD / l_safe_KM[..., None], q1 - q0).to(q.dtype)
        lse_KM = torch.where(seen_KM, m_KM + torch.log(l_safe_KM), float("-inf"))
        lse_HT[:, q0:q1] = lse_KM.view(Hq, q1 - q0)
    return out_THD, lse_HT


@torch.no_grad()
def blockwise_attn_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal=True,
    softmax_scale=None,
    block_q: int = 128,
    block_k: int = 512,
):
    """Blockwise backward; arguments as `torch_attn_bwd` plus tile sizes.

    Recomputes p = exp(s - lse) per tile; ds = p * (dp - rowsum(dout * out)).
    Returns (dq_THD, dk_TKD, dv_TKD) in the input dtype.
    """
    T, _, D = q.shape
    Tk, K, _ = k.shape
    cd, scale = acc_dtype(q.dtype), default_softmax_scale(D, softmax_scale)
    klo_T, khi_T = _key_intervals(cu_seqlens_q, cu_seqlens_k, causal, T, q.device)
    dq_THD = torch.full_like(q, float("nan"))
    dk_KTD = q.new_zeros((K, Tk, D), dtype=cd)  # accumulators: keys no query sees keep 0
    dv_KTD = torch.zeros_like(dk_KTD)
    lse_HT = lse.to(cd)
    for b, (lo, hi) in enumerate(_block_key_ranges(klo_T, khi_T, block_q, Tk)):
        q0, q1 = b * block_q, min(T, (b + 1) * block_q)
        q_KMD, do_KMD = _heads_as_rows(q[q0:q1], K, cd), _heads_as_rows(dout[q0:q1], K, cd)
        delta_KM = (do_KMD * _heads_as_rows(out[q0:q1], K, cd)).sum(dim=-1)
        lse_KM = lse_HT[:, q0:q1].reshape(K, -1)
        lse_safe_KM = torch.where(torch.isfinite(lse_KM), lse_KM, 0.0)
        dq_KMD = torch.zeros_like(q_KMD)
        for k0 in range(lo, hi, block_k):
            k1 = min(hi, k0 + block_k)
            k_KCD, v_KCD = k[k0:k1].to(cd).transpose(0, 1), v[k0:k1].to(cd).transpose(0, 1)
            s_KMC = _masked_scores(q_KMD, k, klo_T, khi_T, q0, q1, k0, k1, scale)
            p_KMC = torch.exp(s_KMC - lse_safe_KM[..., None])
            dp_KMC = torch.bmm(do_KMD, v_KCD.transpose(1, 2))
            ds_KMC = p_KMC * (dp_KMC - delta_KM[..., None])
            dq_KMD += torch.bmm(ds_KMC, k_KCD)
            dk_KTD[:, k0:k1] += torch.bmm(ds_KMC.transpose(1, 2), q_KMD)
            dv_KTD[:, k0:k1] += torch.bmm(p_KMC.transpose(1, 2), do_KMD)
        dq_THD[q0:q1] = _rows_as_heads(dq_KMD * scale, q1 - q0).to(q.dtype)
    dk_TKD = (dk_KTD * scale).transpose(0, 1).to(k.dtype)
    return dq_THD, dk_TKD, dv_KTD.transpose(0, 1).to(v.dtype)


# ----------------------------------------------------------------------------------------------
# The backend's entry points
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def torch_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length attention forward (no autograd).

    Args: q [Tq, Hq, D], k / v [Tk, K, D] (Hq % K == 0), cu_seqlens_q / _k [N + 1] int,
    max_seqlen_* (unused here: the document lengths are read from cu_seqlens), causal
    (bottom-right aligned), softmax_scale (default 1 / sqrt(D)).
    Returns (out_THD [Tq, Hq, D] in q's dtype, lse_HT [Hq, Tq] float32, float64 for float64).
    """
    check_attn_args("torch_attn_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
    if _use_cpu_flash(q):
        scale = default_softmax_scale(q.shape[-1], softmax_scale)
        return _cpu_flash_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    return blockwise_attn_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale
    )


@torch.no_grad()
def torch_attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Variable-length attention backward (no autograd), recomputed from the forward's result.

    Args: dout / out [Tq, Hq, D], lse [Hq, Tq] (from the forward), the rest as
    `torch_attn_fwd`. Returns (dq [Tq, Hq, D], dk [Tk, K, D], dv [Tk, K, D]) in the inputs'
    dtype.
    """
    check_attn_args(
        "torch_attn_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k, dout_THD=dout, out_THD=out,
        lse_HT=lse,
    )  # fmt: skip
    scale = default_softmax_scale(q.shape[-1], softmax_scale)
    dout, out = dout.to(q.dtype), out.to(q.dtype)  # e.g. a float32 merged out for bf16 q
    if _use_cpu_flash(q):
        return _cpu_flash_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale)
    return blockwise_attn_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        softmax_scale,
    )
