"""Fused linear + cross-entropy for GPUs: logits exist one tile of tokens at a time, and a
Triton kernel turns each tile into its losses and, in place, its logit gradients.

Legend (kernels/__init__.py): T tokens, E model width, V vocabulary; added here: t the tokens
of one tile (as in tiled_ce.py), BV a block of the vocabulary.

Per tile of t tokens (the algorithm of Liger-Kernel's fused linear cross-entropy, written here
from its description): logits_tV = hidden_tE @ weight_VE^T (one GEMM); `ce_tile_kernel`
runs per row an online max / sum-exp over V, writes ce_r = lse_r - logit_r[label_r] and
overwrites the row with its gradient w_r * (softmax_r - onehot(label_r)); two more GEMMs
give dhidden_tE = dlogits_tV @ weight_VE and add dlogits_tV^T @ hidden_tE to dweight_VE.
Gradients are thus computed in the forward (when an input requires grad) and the backward
only scales them by the incoming scalar gradient; nothing [T, V] ever exists. The loss is
sum_r w_r * ce_r, so token weights that require grad get ce_r (as the torch path gives).

Semantics as `kernels.loss.linear_cross_entropy`: the sum over tokens of w_t * CE(t); rows
whose label is `ignore_index` add 0 and get zero gradient; labels must otherwise lie in
[0, V) (not checked: that would synchronise the GPU). Precision: softmax and loss in float32
(float64 for float64 inputs). 16-bit inputs take 16-bit GEMMs with float32 outputs
(`torch.mm(..., out_dtype=float32)` on CUDA; exactly emulated by upcasting on CPU, the
interpreter's path): the logits are never rounded to 16 bits; the logit gradients are, once,
to feed the two backward GEMMs (as in any 16-bit training); dweight accumulates over tiles in
float32. Peak extra memory: one [t, V] float32 tile plus its 16-bit copy, dhidden [T, E] and
a float32 dweight [V, E].
Liger-Kernel's own function is not used: it has no per-token weights.

Chain: `ce_tile_kernel` -> `_linear_ce_fwd` (tile loop) -> custom op
`longtrain::triton_linear_ce` (fake impl for torch.compile) -> `TritonLinearCEFunction` ->
`triton_linear_cross_entropy`.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels._triton_utils import check_triton_tensors
from kernels.precision import FLOAT_DTYPES, acc_dtype

__all__ = ["TritonLinearCEFunction", "ce_tile", "triton_linear_cross_entropy"]

_BLOCK_V = 1024


@triton.jit
def ce_tile_kernel(
    logits_ptr,
    stride_lr,
    labels_ptr,
    weights_ptr,
    ce_ptr,
    V,
    ignore_index,
    HAS_WEIGHTS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: ce[r] = lse - logit[label] (0 if ignored); WRITE_GRAD: row <- w * (softmax -
    onehot), w = 0 if ignored."""
    r = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + r * stride_lr
    label = tl.load(labels_ptr + r).to(tl.int64)
    ignored = label == ignore_index
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + r).to(COMPUTE)
    else:
        w = tl.full([], 1.0, COMPUTE)
    w = tl.where(ignored, 0.0, w).to(COMPUTE)

    # Online max / sum of exp over the row, one block of BV logits at a time.
    m = tl.full([], float("-inf"), COMPUTE)
    s = tl.zeros([], COMPUTE)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(COMPUTE)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(row_ptr + tl.where(ignored, 0, label)).to(COMPUTE)
    tl.store(ce_ptr + r, tl.where(ignored, 0.0, lse - target))

    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(COMPUTE)
            grad = w * (tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0))
            tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    """Whether this torch's CUDA `mm` takes 16-bit operands with a float32 output."""
    a = torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 (float64 for float64): for 16-bit operands a 16-bit GEMM that
    accumulates and returns float32 (CUDA), emulated exactly by upcasting on CPU."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        if _cuda_mm_has_out_dtype():
            return torch.mm(a, b, out_dtype=torch.float32)
        return (a @ b).float()  # older torch: the output is rounded to 16 bits first
    return a.float() @ b.float()


def ce_tile(
    logits_tV: torch.Tensor,
    labels_t: torch.Tensor,
    token_weights_t: torch.Tensor | None,
    ignore_index: int,
    write_grad: bool,
    ce_t: torch.Tensor,
) -> None:
    """Launch `ce_tile_kernel` on one tile: fills ce_t (unweighted CE, float32 / float64)
    and, when `write_grad`, overwrites logits_tV (unit stride over V) with its gradient."""
    t, V = logits_tV.shape
    if t == 0:
        return
    compute = tl.float64 if ce_t.dtype == torch.float64 else tl.float32
    ce_tile_kernel[(t,)](
        logits_tV, logits_tV.stride(0), labels_t,
        labels_t if token_weights_t is None else token_weights_t, ce_t, V, ignore_index,
        HAS_WEIGHTS=token_weights_t is not None, WRITE_GRAD=write_grad, COMPUTE=compute,
        BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(V)),
    )  # fmt: skip


def _linear_ce_fwd(
    hidden_TE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_T: torch.Tensor,
    token_weights_T: torch.Tensor | None,
    ignore_index: int,
    tile_tokens: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum, dhidden_TE, dweight_VE, ce_T) for unit upstream gradient; the gradients
    are empty tensors when not `need_grad`; ce_T [T] is the unweighted CE (0 if ignored)."""
    T, E = hidden_TE.shape
    V = weight_VE.shape[0]
    compute = acc_dtype(hidden_TE.dtype)
    ce_T = torch.empty(T, dtype=compute, device=hidden_TE.device)
    dhidden_TE = torch.empty_like(hidden_TE) if need_grad else hidden_TE.new_empty(0)
    dweight_VE = weight_VE.new_zeros((V, E), dtype=compute) if need_grad else hidden_TE.new_empty(0)
    for t0 in range(0, T, tile_tokens):
        t1 = min(t0 + tile_tokens, T)
        hidden_tE = hidden_TE[t0:t1]
        logits_tV = _mm(hidden_tE, weight_VE.t())  # float32: no 16-bit rounding of logits
        weights_t = None if token_weights_T is None else token_weights_T[t0:t1]
        ce_tile(logits_tV, labels_T[t0:t1], weights_t, ignore_index, need_grad, ce_T[t0:t1])
        if need_grad:  # logits_tV now holds dloss/dlogits, the operand of two more GEMMs
            dlogits_tV = logits_tV.to(hidden_TE.dtype)
            dhidden_TE[t0:t1] = _mm(dlogits_tV, weight_VE)
            dweight_VE += _mm(dlogits_tV.t(), hidden_tE)
    loss = ce_T.sum() if token_weights_T is None else (ce_T * token_weights_T.to(compute)).sum()
    return loss, dhidden_TE, dweight_VE, ce_T


@torch.library.custom_op("longtrain::triton_linear_ce", mutates_args=())
def _linear_ce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    ignore_index: int,
    tile_tokens: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = [hidden, weight, labels] + ([] if token_weights is None else [token_weights])
    check_triton_tensors("triton_linear_cross_entropy", *tensors)
    return _linear_ce_fwd(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(),
        None if token_weights is None else token_weights.contiguous(),
        ignore_index, tile_tokens, need_grad,
    )  # fmt: skip


@_linear_ce_op.register_fake
def _(hidden, weight, labels, token_weights, ignore_index, tile_tokens, need_grad):
    compute = acc_dtype(hidden.dtype)
    loss, ce = hidden.new_empty((), dtype=compute), hidden.new_empty(labels.shape, dtype=compute)
    if not need_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0), ce
    return loss, torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=compute), ce


class TritonLinearCEFunction(torch.autograd.Function):
    """Gradients come out of the forward; the backward scales them by the scalar grad."""

    @staticmethod
    def forward(ctx, hidden_TE, weight_VE, labels_T, token_weights_T, ignore_index, tile_tokens):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, dhidden_TE, dweight_VE, ce_T = torch.ops.longtrain.triton_linear_ce(
            hidden_TE, weight_VE, labels_T, token_weights_T, ignore_index, tile_tokens, need_grad
        )
        ctx.save_for_backward(dhidden_TE, dweight_VE, ce_T)
        ctx.dtypes = (hidden_TE.dtype, weight_VE.dtype)
        ctx.weights_dtype = None if token_weights_T is None else token_weights_T.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dhidden_TE, dweight_VE, ce_T = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dhidden = dweight = dweights = None
        if ctx.needs_input_grad[0]:
            dhidden = (dhidden_TE * grad_loss.to(dhidden_TE.dtype)).to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            dweight = (dweight_VE * grad_loss.to(dweight_VE.dtype)).to(weight_dtype)
        if ctx.needs_input_grad[3]:
            dweights = (ce_T * grad_loss.to(ce_T.dtype)).to(ctx.weights_dtype)
        return dhidden, dweight, None, dweights, None, None


def triton_linear_cross_entropy(
    hidden_TE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_T: torch.Tensor,
    token_weights_T: torch.Tensor | None = None,
    ignore_index: int = -100,
    tile_tokens: int = 4096,
) -> torch.Tensor:
    """Sum over tokens of w_t * CE(hidden_t @ weight^T, label_t), never materialising [T, V].

    hidden_TE [T, E], weight_VE [V, E] (same dtype: float16/bfloat16/float32/float64),
    labels_T [T] int (ignore_index adds 0), token_weights_T [T] float or None (all 1),
    tile_tokens: tokens per logits tile (peak extra memory ~ tile_tokens x V). Returns a
    scalar (float32; float64 for float64 inputs), differentiable in hidden, weight and
    token_weights.
    """
    if hidden_TE.dim() != 2 or weight_VE.dim() != 2 or hidden_TE.shape[1] != weight_VE.shape[1]:
        raise ValueError(
            f"triton_linear_cross_entropy: expected hidden [T, E] and weight [V, E], got "
            f"{tuple(hidden_TE.shape)} and {tuple(weight_VE.shape)}"
        )
    T = hidden_TE.shape[0]
    if labels_T.shape != (T,) or labels_T.dtype.is_floating_point:
        raise ValueError(
            f"triton_linear_cross_entropy: labels must be int [{T}], got "
            f"{labels_T.dtype} {tuple(labels_T.shape)}"
        )
    if token_weights_T is not None and token_weights_T.shape != (T,):
        raise ValueError(
            f"triton_linear_cross_entropy: token_weights must be [{T}], got "
            f"{tuple(token_weights_T.shape)}"
        )
    if hidden_TE.dtype not in FLOAT_DTYPES or weight_VE.dtype != hidden_TE.dtype:
        raise ValueError(
            f"triton_linear_cross_entropy: hidden and weight must share a float dtype, got "
            f"{hidden_TE.dtype} and {weight_VE.dtype}"
        )
    if tile_tokens < 1:
        raise ValueError(
            f"triton_linear_cross_entropy: tile_tokens must be >= 1, got {tile_tokens}"
        )
    return TritonLinearCEFunction.apply(
        hidden_TE, weight_VE, labels_T, token_weights_T, int(ignore_index), int(tile_tokens)
    )
