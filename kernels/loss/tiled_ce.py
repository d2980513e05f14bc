"""Linear + cross-entropy over token tiles: the [T, V] logits exist for one tile at a time.

Legend (kernels/__init__.py): T tokens, E model width, V vocabulary size; added here: t the
tokens of one tile.

Memory choice: the gradients are computed in the forward, tile by tile, while each tile's
logits are at hand (as Liger's fused linear cross-entropy and DeepSpeed's tiled logits loss
do); the backward only scales them by the incoming gradient. Recomputing in the backward
instead would hold the same buffers at the loss's backward (grad_hidden [T, E] and an
fp32 grad_weight [V, E] are needed then anyway, and nothing is freed between the loss's
forward and its backward), so the peak is the same, and it would cost a second logits
matmul. Peak extra memory: one [t, V] logits tile in float32 (float64), grad_hidden [T, E] in
hidden's dtype, grad_weight [V, E] and a float32 copy of the weight when it is lower
precision. Gradients are computed only when grad mode is on and an input requires them.
"""

import torch

from kernels.precision import acc_dtype

_EMPTY = (0,)


def _ce_fwd_impl(
    hidden_TE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_T: torch.Tensor,
    token_weights_T: torch.Tensor | None,
    ignore_index: int,
    tile_tokens: int,
    want_dhidden: bool,
    want_dweight: bool,
    want_dweights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and its gradients, tile by tile.

    Returns (loss [], dhidden [T, E] or [0], dweight [V, E] (compute dtype) or [0],
    ce_T [T] (unweighted CE, 0 where ignored) or [0]); gradients are of the loss sum."""
    # The precision is chosen here (float32, float64 for float64): an enclosing autocast must
    # not turn the logits into bf16 or mix dtypes in the gradient GEMMs.
    with torch.autocast(hidden_TE.device.type, enabled=False):
        return _ce_tiles(
            hidden_TE, weight_VE, labels_T, token_weights_T, ignore_index, tile_tokens,
            want_dhidden, want_dweight, want_dweights,
        )  # fmt: skip


def _ce_tiles(
    hidden_TE, weight_VE, labels_T, token_weights_T, ignore_index, tile_tokens,
    want_dhidden, want_dweight, want_dweights,
):  # fmt: skip
    T, E = hidden_TE.shape
    compute = acc_dtype(hidden_TE.dtype, weight_VE.dtype)
    w_VE = weight_VE.to(compute)
    loss = hidden_TE.new_zeros((), dtype=compute)
    dhidden_TE = torch.empty_like(hidden_TE) if want_dhidden else hidden_TE.new_empty(_EMPTY)
    dweight_VE = torch.zeros_like(w_VE) if want_dweight else w_VE.new_empty(_EMPTY)
    ce_out_T = hidden_TE.new_empty((T,) if want_dweights else _EMPTY, dtype=compute)
    for t0 in range(0, T, tile_tokens):
        t1 = min(T, t0 + tile_tokens)
        h_tE = hidden_TE[t0:t1].to(compute)
        labels_t = labels_T[t0:t1].long()
        valid_t = labels_t != ignore_index
        target_t = torch.where(valid_t, labels_t, 0)
        logits_tV = h_tE @ w_VE.t()  # the one [t, V] buffer of this tile, reused in place
        target_logit_t = logits_tV.gather(1, target_t[:, None]).squeeze(1)
        max_t = logits_tV.amax(dim=1)
        probs_tV = logits_tV.sub_(max_t[:, None]).exp_()  # unnormalised softmax, in place
        sumexp_t = probs_tV.sum(dim=1)
        ce_t = torch.where(valid_t, max_t + sumexp_t.log() - target_logit_t, 0.0)
        coef_t = valid_t.to(compute)
        if token_weights_T is not None:
            coef_t = coef_t * token_weights_T[t0:t1].to(compute)
        loss += (ce_t * coef_t).sum()
        if want_dweights:
            ce_out_T[t0:t1] = ce_t
        if want_dhidden or want_dweight:
            # d loss / d logits = coef * (softmax - onehot(label))
            dlogits_tV = probs_tV.mul_((coef_t / sumexp_t)[:, None])
            dlogits_tV[torch.arange(t1 - t0, device=h_tE.device), target_t] -= coef_t
            if want_dhidden:
                dhidden_TE[t0:t1] = (dlogits_tV @ w_VE).to(hidden_TE.dtype)
            if want_dweight:
                dweight_VE.addmm_(dlogits_tV.t(), h_tE)
        # Free this tile's [t, V] buffer before the next tile's GEMM allocates its own:
        # otherwise two tiles are alive at the peak.
        del logits_tV, probs_tV
        if want_dhidden or want_dweight:
            del dlogits_tV
    return loss, dhidden_TE, dweight_VE, ce_out_T


_ce_fwd_op = torch.library.custom_op(
    "longtrain::linear_cross_entropy_fwd", _ce_fwd_impl, mutates_args=()
)


@_ce_fwd_op.register_fake
def _ce_fwd_fake(hidden_TE, weight_VE, labels_T, token_weights_T, *_flags_and_sizes):
    want_dhidden, want_dweight, want_dweights = _flags_and_sizes[2:]
    compute = acc_dtype(hidden_TE.dtype, weight_VE.dtype)
    T = hidden_TE.shape[0]
    return (
        hidden_TE.new_empty((), dtype=compute),
        torch.empty_like(hidden_TE) if want_dhidden else hidden_TE.new_empty(_EMPTY),
        weight_VE.new_empty(weight_VE.shape if want_dweight else _EMPTY, dtype=compute),
        hidden_TE.new_empty((T,) if want_dweights else _EMPTY, dtype=compute),
    )


def _setup_context(ctx, inputs, output):
    hidden_TE, weight_VE, _, token_weights_T = inputs[:4]
    _, dhidden_TE, dweight_VE, ce_T = output
    ctx.save_for_backward(dhidden_TE, dweight_VE, ce_T)
    ctx.mark_non_differentiable(dhidden_TE, dweight_VE, ce_T)  # carriers, not results
    ctx.wants = inputs[6:9]
    ctx.dtypes = (hidden_TE.dtype, weight_VE.dtype)
    ctx.weights_dtype = None if token_weights_T is None else token_weights_T.dtype


def _backward(ctx, dloss, *_unused_grads_of_grads):
    dhidden_TE, dweight_VE, ce_T = ctx.saved_tensors
    want_dhidden, want_dweight, want_dweights = ctx.wants
    if dloss is None:  # the loss was not used
        want_dhidden = want_dweight = want_dweights = False
    d_hidden = (dhidden_TE * dloss).to(ctx.dtypes[0]) if want_dhidden else None
    d_weight = (dweight_VE * dloss).to(ctx.dtypes[1]) if want_dweight else None
    d_weights = (ce_T * dloss).to(ctx.weights_dtype) if want_dweights else None
    return d_hidden, d_weight, None, d_weights, None, None, None, None, None


_ce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """The eager path (the custom op's first call imports torch._dynamo, ~1 s per process)."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)
        output = _ce_fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss, *_unused_grads_of_grads):
        return _backward(ctx, dloss)


def torch_linear_cross_entropy(
    hidden_TE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_T: torch.Tensor,
    token_weights_T: torch.Tensor | None = None,
    ignore_index: int = -100,
    tile_tokens: int = 4096,
) -> torch.Tensor:
    """Tiled linear + cross-entropy (inputs assumed validated); see `linear_cross_entropy`."""
    grad_on = torch.is_grad_enabled()
    want_dweights = token_weights_T is not None and token_weights_T.requires_grad and grad_on
    op = _ce_fwd_op if torch.compiler.is_compiling() else _LinearCrossEntropyFunction.apply
    loss, *_ = op(
        hidden_TE,
        weight_VE,
        labels_T,
        token_weights_T,
        ignore_index,
        tile_tokens,
        grad_on and hidden_TE.requires_grad,
        grad_on and weight_VE.requires_grad,
        want_dweights,
    )
    return loss
