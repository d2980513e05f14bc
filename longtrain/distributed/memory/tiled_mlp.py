"""Tiled MLP: the MLP runs over sequence tiles, so its [T, F] intermediates exist for one tile
at a time; the backward recomputes each tile's MLP and backpropagates it tile by tile.

Legend: T tokens (flattened leading dims), D model width, F MLP (intermediate) width,
t tokens in one tile.

Exact: every token's MLP is independent of the others, so the outputs and the input gradients
are the untiled ones (up to the matmul kernel's blocking); parameter gradients are sums over
tiles of the per-tile sums over tokens, i.e. the same sum reassociated.

Memory (one block, bf16 compute, Llama-3-8B F = 14336): untiled, the forward keeps w1(x), w3(x),
silu(w1 x) and their product, 4 x [T, F]; tiled, it keeps only x [T, D] and holds one tile's
[t, F] intermediates at a time, in the forward and again in the backward.

Parameter gradients accumulate into `.grad` from inside the backward (as a reentrant
checkpoint does), once per tile. DeepSpeed ZeRO reduces a gradient as soon as it is
accumulated unless the parameter's `ds_grad_is_ready` is False: that attribute is set to
False for every tile but the last (other engines ignore it). Consequence: use
`loss.backward()` (or an engine's backward), not `torch.autograd.grad` over the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from longtrain.distributed.memory.mixin import mix_into

MIB = 1 << 20


def num_mlp_tiles(
    num_tokens: int, ffn_dim: int, elem_bytes: int, tiles: int, budget_mib: float
) -> int:
    """How many tiles an MLP over `num_tokens` tokens runs in.

    tiles >= 1: that many (never more than there are tokens). tiles == 0: the fewest tiles
    whose [t, F] intermediate (t tokens x `ffn_dim` x `elem_bytes`) fits `budget_mib` MiB.
    Every rank of a sequence-parallel group holds the same number of tokens, so every rank
    runs the same number of tiles (ZeRO-3 gathers parameters per tile: counts must agree).
    """
    if tiles < 0:
        raise ValueError(f"train.memory.mlp_tiles={tiles} must be >= 0 (0: from the budget)")
    if num_tokens <= 0:
        return 1
    if tiles == 0:
        if budget_mib <= 0:
            raise ValueError(
                f"train.memory.mlp_tile_budget_mib={budget_mib} must be > 0 when mlp_tiles=0"
            )
        tiles = math.ceil(num_tokens * ffn_dim * elem_bytes / (budget_mib * MIB))
    return max(1, min(tiles, num_tokens))


def _tile_bounds(num_tokens: int, tiles: int) -> list[tuple[int, int]]:
    """[start, end) of each tile: sizes differ by at most one token."""
    edges = [num_tokens * i // tiles for i in range(tiles + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _mark_grads_ready(params: list[nn.Parameter], ready: bool) -> None:
    # DeepSpeed ZeRO's protocol for a gradient accumulated over several backward calls.
    for p in params:
        p.ds_grad_is_ready = ready


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _TiledMLPFunction(torch.autograd.Function):
    """out_TD = cat_i fn(x_TD[tile_i]); forward without a graph, backward by recomputation."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, fn: Callable, tiles: int, params: list) -> torch.Tensor:
        bounds = _tile_bounds(x_TD.shape[0], tiles)
        ctx.fn, ctx.bounds, ctx.params = fn, bounds, params
        ctx.autocast = _autocast_state(x_TD.device.type)
        ctx.save_for_backward(x_TD)
        out_TD = None
        for t0, t1 in bounds:
            out_tD = fn(x_TD[t0:t1])
            if out_TD is None:  # the output's dtype is known once the first tile has run
                out_TD = out_tD.new_empty((x_TD.shape[0], *out_tD.shape[1:]))
            out_TD[t0:t1] = out_tD
            del out_tD
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD: torch.Tensor):
        (x_TD,) = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        dx_TD = torch.empty_like(x_TD) if needs_dx else None
        enabled, dtype = ctx.autocast
        device_type = x_TD.device.type
        last = len(ctx.bounds) - 1
        for i, (t0, t1) in enumerate(ctx.bounds):
            _mark_grads_ready(ctx.params, ready=i == last)
            x_tD = x_TD[t0:t1].detach().requires_grad_(needs_dx)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                out_tD = ctx.fn(x_tD)
            torch.autograd.backward(out_tD, dout_TD[t0:t1])
            if needs_dx:
                dx_TD[t0:t1] = x_tD.grad
            del out_tD, x_tD
        return dx_TD, None, None, None


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tiles: int,
    params: list[nn.Parameter],
) -> torch.Tensor:
    """fn applied to `x` [..., T, D] in `tiles` tiles along the flattened tokens.

    `fn` must act on each token independently ([t, D] -> [t, D_out]) and read only the
    parameters `params` (they receive their gradients from inside the backward).
    """
    if tiles <= 1 or not torch.is_grad_enabled():
        return fn(x)
    x_TD = x.reshape(-1, x.shape[-1])
    out_TD = _TiledMLPFunction.apply(x_TD, fn, tiles, params)
    return out_TD.view(*x.shape[:-1], out_TD.shape[-1])


class TiledMLPMixin:
    """Mixed into an MLP module's class by `tile_mlp`: the same module (same parameters, same
    state-dict names), run in tiles. Configure with `configure_tiling`."""

    _tiles: int = 1  # fixed count (>= 1), or 0 for "from the budget"
    _tile_budget_mib: float = 256.0
    _ffn_dim: int = 0

    def configure_tiling(self, tiles: int, budget_mib: float, ffn_dim: int) -> None:
        if tiles < 0:
            raise ValueError(f"train.memory.mlp_tiles={tiles} must be >= 0 (0: from the budget)")
        self._tiles, self._tile_budget_mib, self._ffn_dim = tiles, budget_mib, ffn_dim

    def tiles_for(self, x: torch.Tensor) -> int:
        """The number of tiles a forward on `x` [..., T, D] uses."""
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type)
        if not torch.is_autocast_enabled(device_type):
            dtype = x.dtype
        num_tokens = x.numel() // x.shape[-1]
        return num_mlp_tiles(
            num_tokens, self._ffn_dim, dtype.itemsize, self._tiles, self._tile_budget_mib
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.parameters() if p.requires_grad]
        return tiled_apply(super().forward, x, self.tiles_for(x), params)


def tile_mlp(module: nn.Module, tiles: int, budget_mib: float, ffn_dim: int) -> nn.Module:
    """Make `module` (an MLP acting on each token of [..., T, D] independently) run in tiles,
    in place: its class becomes a subclass with TiledMLPMixin, as `fully_shard` does, so its
    parameters, their names and state dicts do not change. Returns the module.

    tiles >= 1: that many tiles; 0: as many as keep one [t, ffn_dim] intermediate within
    `budget_mib` MiB (in the compute dtype). Applying it again only reconfigures.
    """
    mix_into(module, TiledMLPMixin, "Tiled")
    module.configure_tiling(tiles, budget_mib, ffn_dim)
    return module


__all__ = ["TiledMLPMixin", "num_mlp_tiles", "tile_mlp", "tiled_apply"]
