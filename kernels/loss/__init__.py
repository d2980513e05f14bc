"""Output projection + cross-entropy without materialising the [T, V] logits.

Legend (kernels/__init__.py): T tokens, E model width, V vocabulary size.

Chain: `tiled_ce` (torch, custom op `longtrain::linear_cross_entropy_fwd` with its autograd)
or `triton_ce` (GPU, imported lazily) -> `linear_cross_entropy` (validation, dispatch).
"""

import importlib

import torch

from kernels.loss.naive import linear_cross_entropy_naive
from kernels.loss.tiled_ce import torch_linear_cross_entropy
from kernels.precision import FLOAT_DTYPES

__all__ = ["BACKENDS", "linear_cross_entropy", "linear_cross_entropy_naive"]

BACKENDS = ("auto", "torch", "triton")


def _validate(hidden_TE, weight_VE, labels_T, token_weights_T, ignore_index, tile_tokens):
    if hidden_TE.dim() != 2 or weight_VE.dim() != 2 or hidden_TE.shape[1] != weight_VE.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: expected hidden [T, E] and weight [V, E], got "
            f"{tuple(hidden_TE.shape)} and {tuple(weight_VE.shape)}"
        )
    if hidden_TE.dtype not in FLOAT_DTYPES or weight_VE.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"linear_cross_entropy: hidden and weight must be float, got {hidden_TE.dtype} "
            f"and {weight_VE.dtype}"
        )
    T, V = hidden_TE.shape[0], weight_VE.shape[0]
    if labels_T.shape != (T,) or labels_T.dtype.is_floating_point or labels_T.dtype == torch.bool:
        raise ValueError(
            f"linear_cross_entropy: labels must be integer [{T}], got {labels_T.dtype} "
            f"{tuple(labels_T.shape)}"
        )
    if token_weights_T is not None and (
        token_weights_T.shape != (T,) or not token_weights_T.dtype.is_floating_point
    ):
        raise ValueError(
            f"linear_cross_entropy: token_weights must be float [{T}], got "
            f"{token_weights_T.dtype} {tuple(token_weights_T.shape)}"
        )
    if tile_tokens < 1:
        raise ValueError(f"linear_cross_entropy: tile_tokens must be >= 1, got {tile_tokens}")
    # Reading the labels would sync a GPU or break a compiled graph: check them on CPU only.
    if labels_T.device.type == "cpu" and not torch.compiler.is_compiling():
        bad_T = (labels_T != ignore_index) & ((labels_T < 0) | (labels_T >= V))
        if bool(bad_T.any()):
            first = int(bad_T.nonzero()[0, 0])
            raise ValueError(
                f"linear_cross_entropy: label {int(labels_T[first])} at token {first} is "
                f"outside [0, {V}) and is not ignore_index {ignore_index}"
            )


def linear_cross_entropy(
    hidden_TE: torch.Tensor,
    weight_VE: torch.Tensor,
    labels_T: torch.Tensor,
    token_weights_T: torch.Tensor | None = None,
    ignore_index: int = -100,
    tile_tokens: int = 4096,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted SUM over tokens of cross-entropy(hidden_t @ weight.T, label_t).

    Args: hidden_TE [T, E], weight_VE [V, E] (float; may differ in dtype for `torch`),
    labels_T [T] integer in [0, V) or `ignore_index` (adds 0, gets zero gradient),
    token_weights_T [T] float or None (all 1; differentiated too when it requires grad),
    tile_tokens: tokens per logits tile (extra memory ~ tile_tokens x V x 4 bytes),
    backend: `auto` (the torch path, for now), `torch`, or `triton` (kernels.loss.triton_ce).
    Returns a scalar, float32 (float64 when an input is float64), differentiable in hidden
    and weight. Math (logits, softmax, loss) in float32, or float64 for float64.
    Raises ValueError on bad shapes, dtypes, labels, tile size or backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; expected one of {BACKENDS}")
    _validate(hidden_TE, weight_VE, labels_T, token_weights_T, ignore_index, tile_tokens)
    if backend == "triton":  # GPU kernels: imported only when asked for
        fn = importlib.import_module("kernels.loss.triton_ce").triton_linear_cross_entropy
    else:
        fn = torch_linear_cross_entropy
    return fn(hidden_TE, weight_VE, labels_T, token_weights_T, int(ignore_index), int(tile_tokens))
