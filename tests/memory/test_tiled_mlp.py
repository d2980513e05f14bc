"""Tiled MLP: the outputs and gradients of the untiled MLP, with [t, F] intermediates of one
tile at a time, in float64 and under bf16 autocast."""

import copy

import pytest
import torch

from longtrain.distributed.memory.tiled_mlp import num_mlp_tiles, tile_mlp
from longtrain.model.llama import SwiGLU
from longtrain.torch_private import TorchDispatchMode

D, F = 24, 40


class _Sizes(TorchDispatchMode):
    """Largest tensor (in elements) that any op outputs, and the dtypes of matmul outputs."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.mm_dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                    self.mm_dtypes.add(t.dtype)
        return out


def _pair(tiles, dtype=torch.float64, budget_mib=256.0):
    torch.manual_seed(0)
    plain = SwiGLU(D, F).to(dtype)
    tiled = tile_mlp(copy.deepcopy(plain), tiles, budget_mib, F)
    return plain, tiled


def _run(mlp, x):
    x = x.detach().clone().requires_grad_(True)
    out = mlp(x)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    out.backward(dout)
    return out.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters()}


def test_num_mlp_tiles_integers():
    mib = 1 << 20
    assert num_mlp_tiles(1000, 100, 4, tiles=3, budget_mib=1) == 3
    assert num_mlp_tiles(5, 100, 4, tiles=8, budget_mib=1) == 5  # never more tiles than tokens
    # 1000 x 100 x 4 B = 400000 B; 0.1 MiB = 104857.6 B per tile -> ceil(3.81) = 4 tiles
    assert num_mlp_tiles(1000, 100, 4, tiles=0, budget_mib=0.1) == 4
    assert num_mlp_tiles(1000, 100, 4, tiles=0, budget_mib=400000 / mib) == 1
    with pytest.raises(ValueError, match="mlp_tile_budget_mib=0"):
        num_mlp_tiles(10, 10, 4, tiles=0, budget_mib=0)
    with pytest.raises(ValueError, match="mlp_tiles=-1"):
        num_mlp_tiles(10, 10, 4, tiles=-1, budget_mib=1)


@pytest.mark.parametrize("T,tiles", [(37, 4), (37, 37), (64, 3), (5, 2)], ids=lambda v: str(v))
def test_tiled_equals_untiled_float64(T, tiles):
    plain, tiled = _pair(tiles)
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out_p, dx_p, g_p = _run(plain, x)
    out_t, dx_t, g_t = _run(tiled, x)
    # Per token, the same ops on the same numbers: only the matmul kernel's blocking over rows
    # could differ, which float64 rounds far below 1e-13.
    torch.testing.assert_close(out_t, out_p, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dx_t, dx_p, rtol=1e-13, atol=1e-13)
    for name in g_p:
        # Weight gradients sum over tokens: per tile, then over tiles (reassociation, ~T ulp).
        torch.testing.assert_close(g_t[name], g_p[name], rtol=1e-12, atol=1e-12)


def test_leading_dims_are_flattened():
    plain, tiled = _pair(3)
    x = torch.randn(2, 9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out_p, dx_p, _ = _run(plain, x)
    out_t, dx_t, _ = _run(tiled, x)
    assert out_t.shape == (2, 9, D)
    torch.testing.assert_close(out_t, out_p, rtol=1e-13, atol=1e-13)  # as above
    torch.testing.assert_close(dx_t, dx_p, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("tiles,budget_mib", [(4, 0.0), (0, 16 * F * 8 / (1 << 20))])
def test_intermediates_are_one_tile(tiles, budget_mib):
    """No op output is larger than one tile's [t, F] (x and out are [T, D], D < F)."""
    T = 64
    _, tiled = _pair(tiles, budget_mib=budget_mib)
    assert tiled.tiles_for(torch.empty(T, D, dtype=torch.float64)) == 4  # budget: 16 tokens
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    sizes = _Sizes()
    with sizes:
        tiled(x).sum().backward()
    assert sizes.largest == max(T * D, 16 * F, D * F)
    untiled = _Sizes()
    _, plain = _pair(1)
    with untiled:
        plain(x).sum().backward()
    assert untiled.largest == T * F  # the check above would see a full intermediate


def test_bf16_autocast_matches_untiled_and_recomputes_in_bf16():
    plain, tiled = _pair(4, dtype=torch.float32)
    ref = copy.deepcopy(plain).double()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
    _, dx_ref, g_ref = _run(ref, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, dx_p, g_p = _run(plain, x)
        sizes = _Sizes()
        out = tiled(x.clone().requires_grad_(True))
    with sizes:  # the backward runs outside autocast; the recompute must still be bf16
        out.float().sum().backward()
    assert sizes.mm_dtypes == {torch.bfloat16}
    tiled.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, dx_t, g_t = _run(tiled, x)
    # bf16 rounding dominates; tiling only reassociates sums: the tiled error is at most
    # twice the untiled error against float64 (the kernels' convention), plus bf16's eps
    # for elements where the untiled error happens to be ~0.
    eps = 2.0**-8
    for name in g_ref:
        err_t = (g_t[name].double() - g_ref[name]).abs().max()
        err_p = (g_p[name].double() - g_ref[name]).abs().max()
        assert err_t <= 2 * err_p + eps * g_ref[name].abs().max(), name
    err_t = (dx_t.double() - dx_ref).abs().max()
    err_p = (dx_p.double() - dx_ref).abs().max()
    assert err_t <= 2 * err_p + eps * dx_ref.abs().max()


def test_same_parameters_names_and_class_family():
    plain, tiled = _pair(3)
    assert isinstance(tiled, SwiGLU)
    assert list(tiled.state_dict()) == list(plain.state_dict())
    assert type(tile_mlp(tiled, 5, 1.0, F)) is type(tiled)  # reconfigure, no second wrap
    assert tiled._tiles == 5


def test_deepspeed_grad_ready_only_on_last_tile():
    _, tiled = _pair(3)
    seen = []
    w = tiled.w1.weight
    w.register_post_accumulate_grad_hook(lambda p: seen.append(p.ds_grad_is_ready))
    x = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    tiled(x).sum().backward()
    assert seen == [False, False, True]
