"""Triton RMSNorm (forward and backward) against the float64 torch reference.

Legend (kernels/__init__.py): T tokens, E model width. Reference: `rms_norm_naive` on float64
inputs. Same-dtype comparator: `rms_norm_naive` on the same low-precision inputs (it
normalises in float32, as the kernel does). No `tl.dot` here, so bfloat16 is right in the
interpreter too.
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from kernels.norm import rms_norm, rms_norm_naive
from kernels.norm.triton_norm import rms_norm_triton
from tests.kernels.triton.helpers import DEVICE, assert_2x

EPS = 1e-5


def _inputs(shape: tuple[int, ...], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x, weight, dy


def _run(fn, x, weight, dy):
    x, weight = (t.detach().clone().requires_grad_() for t in (x, weight))
    y = fn(x, weight, EPS)
    dx, dw = torch.autograd.grad(y, (x, weight), dy.to(y))
    return y.detach(), dx, dw


def _check(shape, dtype):
    x, w, dy = _inputs(shape)
    ref = _run(rms_norm_naive, x, w, dy)
    same_dtype = _run(rms_norm_naive, x.to(dtype), w.to(dtype), dy)
    got = _run(rms_norm_triton, x.to(DEVICE, dtype), w.to(DEVICE, dtype), dy.to(DEVICE))
    for name, g, s, r in zip(("y", "dx", "dweight"), got, same_dtype, ref):
        assert g.dtype == dtype and g.shape == r.shape
        assert_2x(name, g, s, r)


# [T, E] and [S, T, E]; T = 130 with E = 16 spans several row blocks and all 4 programs.
FAST = [((63, 40), torch.float32), ((2, 17, 64), torch.bfloat16)]
SLOW = [
    ((T, E), dtype)
    for T, E, dtype in itertools.product(
        [1, 17, 63, 130], [16, 40, 64], [torch.float32, torch.float16, torch.bfloat16]
    )
    if ((T, E), dtype) not in FAST
]


def _id(shape, dtype):
    return "-".join(f"{k}{n}" for k, n in zip("STE"[-len(shape) :], shape)) + f"-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", FAST, ids=[_id(*c) for c in FAST])
def test_matches_reference(case):
    _check(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[_id(*c) for c in SLOW])
def test_matches_reference_sweep(case):
    _check(*case)


def test_float32_weight_with_bfloat16_input():
    """Mixed precision keeps norm weights in float32: y is bfloat16, dweight float32."""
    x, w, dy = _inputs((17, 40))
    y, dx, dw = _run(rms_norm_triton, x.to(DEVICE, torch.bfloat16), w.float().to(DEVICE), dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    ref = _run(rms_norm_naive, x, w, dy)
    same_dtype = _run(rms_norm_naive, x.to(torch.bfloat16), w.float(), dy)
    for name, g, s, r in zip(("y", "dx", "dweight"), (y, dx, dw), same_dtype, ref):
        assert_2x(name, g, s, r)


def test_rms_norm_triton_backend():
    """`rms_norm(backend="triton")` reaches the kernel: the very same result."""
    x, w, _ = _inputs((17, 16))
    x, w = x.float().to(DEVICE), w.float().to(DEVICE)
    assert torch.equal(rms_norm(x, w, EPS, backend="triton"), rms_norm_triton(x, w, EPS))


def test_bad_input_raises():
    x = torch.randn(5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, torch.ones(15, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="float64"):
        rms_norm_triton(x.double(), torch.ones(16, device=DEVICE, dtype=torch.float64), EPS)
