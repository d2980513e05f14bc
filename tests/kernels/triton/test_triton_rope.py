"""Triton RoPE (forward and backward) against the float64 torch reference.

Legend (kernels/__init__.py): T tokens, H heads, D head dim. Reference: RoPE as complex
multiplication in float64 (`tests.kernels.references.rope_complex`, no code shared with the
kernel; the forward's reference, and its transpose, by autograd, the backward's).
Same-dtype comparator: `rope_naive` on the same low-precision inputs. No `tl.dot` here, so
bfloat16 is right in the interpreter too. Positions restart per document and reach ~10^4,
where float32 angles already lose digits: the kernel and `rope_naive` form the angle the same
way (float32 position x float32 inv_freq), so they share that error.
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from kernels.rope import apply_rope, rope_naive
from kernels.rope.triton_rope import rope_triton
from tests.kernels.references import rope_complex
from tests.kernels.triton.helpers import DEVICE, assert_2x


def _inputs(T: int, H: int, D: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    dy = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    # Documents of 1, 5 and the rest; the last starts at a large offset (a later stage's chunk).
    lengths = [n for n in (1, 5, T - 6) if n > 0][: max(1, T)]
    starts = [0, 0, 9000]
    position_ids = torch.cat([s + torch.arange(n) for s, n in zip(starts, lengths)])[:T]
    return x, dy, position_ids


def _run(fn, x, dy, position_ids, theta):
    x = x.detach().clone().requires_grad_()
    y = fn(x, position_ids, theta)
    (dx,) = torch.autograd.grad(y, x, dy.to(y))
    return y.detach(), dx


def _check(T, H, D, dtype, theta=10000.0):
    x, dy, pos = _inputs(T, H, D)
    ref = _run(rope_complex, x, dy, pos, theta)
    same_dtype = _run(rope_naive, x.to(dtype), dy, pos, theta)
    got = _run(rope_triton, x.to(DEVICE, dtype), dy.to(DEVICE), pos.to(DEVICE), theta)
    for name, g, s, r in zip(("y", "dx"), got, same_dtype, ref):
        assert g.dtype == dtype and g.shape == r.shape
        assert_2x(name, g, s, r)


FAST = [(63, 4, 40, torch.float32), (17, 3, 64, torch.bfloat16)]
SLOW = [
    c
    for c in itertools.product(
        [1, 17, 63, 130], [1, 4], [16, 40, 64], [torch.float32, torch.float16, torch.bfloat16]
    )
    if c not in FAST
]


def _id(T, H, D, dtype):
    return f"T{T}-H{H}-D{D}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", FAST, ids=[_id(*c) for c in FAST])
def test_matches_reference(case):
    _check(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[_id(*c) for c in SLOW])
def test_matches_reference_sweep(case):
    _check(*case)


def test_theta_of_a_later_stage():
    """Long-context stages raise theta (e.g. 5e5); the kernel takes it per call."""
    _check(17, 2, 16, torch.float32, theta=500000.0)


def test_apply_rope_triton_backend():
    """`apply_rope(backend="triton")` reaches the kernel: the very same result."""
    x, _, pos = _inputs(17, 2, 16)
    x, pos = x.float().to(DEVICE), pos.to(DEVICE)
    assert torch.equal(apply_rope(x, pos, 1e4, backend="triton"), rope_triton(x, pos, 1e4))


def test_bad_input_raises():
    x = torch.randn(5, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="position_ids"):
        rope_triton(x, torch.arange(5, device=DEVICE).float(), 1e4)
    with pytest.raises(ValueError, match="even"):
        rope_triton(x[..., :15], torch.arange(5, device=DEVICE), 1e4)
    with pytest.raises(ValueError, match="float64"):
        rope_triton(x.double(), torch.arange(5, device=DEVICE), 1e4)
