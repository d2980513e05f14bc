"""Linear + cross-entropy over token tiles: the [T, V] logits exist for one tile at a time.

Legend: T tokens, t tokens of one tile, D model dim, V vocabulary size.

Memory choice: the gradients are computed in the forward, tile by tile, while each tile's
logits are at hand (as Liger's fused linear cross-entropy and DeepSpeed's tiled logits loss
do); the backward only scales them by the incoming gradient. Recomputing in the backward
instead would hold the same buffers at the loss's backward (grad_hidden [T, D] and an
fp32 grad_weight [V, D] are needed then anyway, and nothing is freed between the loss's
forward and its backward), so the peak is the same, and it would cost a second logits
matmul. Peak extra memory: one [t, V] logits tile in float32 (float64), grad_hidden [T, D] in
hidden's dtype, grad_weight [V, D] and a float32 copy of the weight when it is lower
precision. Gradients are computed only when grad mode is on and an input requires them.
"""

import torch

_EMPTY = (0,)


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _ce_fwd_impl(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_T: torch.Tensor,
    token_weights_T: torch.Tensor | None,
    ignore_index: int,
    tile_tokens: int,
    want_dhidden: bool,
    want_dweight: bool,
    want_dweights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and its gradients, tile by tile.

    Returns (loss [], dhidden [T, D] or [0], dweight [V, D] (compute dtype) or [0],
    ce_T [T] (unweighted CE, 0 where ignored) or [0]); gradients are of the loss sum."""
    # The precision is chosen here (float32, float64 for float64): an enclosing autocast must
    # not turn the logits into bf16 or mix dtypes in the gradient GEMMs.
    with torch.autocast(hidden_TD.device.type, enabled=False):
        return _ce_tiles(
            hidden_TD, weight_VD, labels_T, token_weights_T, ignore_index, tile_tokens,
            want_dhidden, want_dweight, want_dweights,
        )  # fmt: skip


def _ce_tiles(
    hidden_TD, weight_VD, labels_T, token_weights_T, ignore_index, tile_tokens,
    want_dhidden, want_dweight, want_dweights,
):  # fmt: skip
    T, D = hidden_TD.shape
    compute = _compute_dtype(hidden_TD.dtype, weight_VD.dtype)
    w_VD = weight_VD.to(compute)
    loss = hidden_TD.new_zeros((), dtype=compute)
    dhidden_TD = torch.empty_like(hidden_TD) if want_dhidden else hidden_TD.new_empty(_EMPTY)
    dweight_VD = torch.zeros_like(w_VD) if want_dweight else w_VD.new_empty(_EMPTY)
    ce_out_T = hidden_TD.new_empty((T,) if want_dweights else _EMPTY, dtype=compute)
    for t0 in range(0, T, tile_tokens):
        t1 = min(T, t0 + tile_tokens)
        h_tD = hidden_TD[t0:t1].to(compute)
        labels_t = labels_T[t0:t1].long()
        valid_t = labels_t != ignore_index
        target_t = torch.where(valid_t, labels_t, 0)
        logits_tV = h_tD @ w_VD.t()  # the one [t, V] buffer of this tile, reused in place
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
            dlogits_tV[torch.arange(t1 - t0, device=h_tD.device), target_t] -= coef_t
            if want_dhidden:
                dhidden_TD[t0:t1] = (dlogits_tV @ w_VD).to(hidden_TD.dtype)
            if want_dweight:
                dweight_VD.addmm_(dlogits_tV.t(), h_tD)
        # Free this tile's [t, V] buffer before the next tile's GEMM allocates its own:
        # otherwise two tiles are alive at the peak.
        del logits_tV, probs_tV
        if want_dhidden or want_dweight:
            del dlogits_tV
    return loss, dhidden_TD, dweight_VD, ce_out_T


_ce_fwd_op = torch.library.custom_op(
    "longtrain::linear_cross_entropy_fwd", _ce_fwd_impl, mutates_args=()
)


@_ce_fwd_op.register_fake
def _ce_fwd_fake(hidden_TD, weight_VD, labels_T, token_weights_T, *_flags_and_sizes):
    want_dhidden, want_dweight, want_dweights = _flags_and_sizes[2:]
    compute = _compute_dtype(hidden_TD.dtype, weight_VD.dtype)
    T = hidden_TD.shape[0]
    return (
        hidden_TD.new_empty((), dtype=compute),
        torch.empty_like(hidden_TD) if want_dhidden else hidden_TD.new_empty(_EMPTY),
        weight_VD.new_empty(weight_VD.shape if want_dweight else _EMPTY, dtype=compute),
        hidden_TD.new_empty((T,) if want_dweights else _EMPTY, dtype=compute),
    )


def _setup_context(ctx, inputs, output):
    hidden_TD, weight_VD, _, token_weights_T = inputs[:4]
    _, dhidden_TD, dweight_VD, ce_T = output
    ctx.save_for_backward(dhidden_TD, dweight_VD, ce_T)
    ctx.mark_non_differentiable(dhidden_TD, dweight_VD, ce_T)  # carriers, not results
    ctx.wants = inputs[6:9]
    ctx.dtypes = (hidden_TD.dtype, weight_VD.dtype)
    ctx.weights_dtype = None if token_weights_T is None else token_weights_T.dtype


def _backward(ctx, dloss, *_unused_grads_of_grads):
    dhidden_TD, dweight_VD, ce_T = ctx.saved_tensors
    want_dhidden, want_dweight, want_dweights = ctx.wants
    if dloss is None:  # the loss was not used
        want_dhidden = want_dweight = want_dweights = False
    d_hidden = (dhidden_TD * dloss).to(ctx.dtypes[0]) if want_dhidden else None
    d_weight = (dweight_VD * dloss).to(ctx.dtypes[1]) if want_dweight else None
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
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
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
        hidden_TD,
        weight_VD,
        labels_T,
        token_weights_T,
        ignore_index,
        tile_tokens,
        grad_on and hidden_TD.requires_grad,
        grad_on and weight_VD.requires_grad,
        want_dweights,
    )
    return loss
