"""RoPE: the torch reference against an independent formula (complex rotation), its defining
properties, and the backend choice (no Triton here; the Triton kernel is tested in
tests/kernels/triton/test_triton_rope.py).

Legend (kernels/__init__.py): T tokens, H heads, D head dim.
"""

import pytest
import torch

from kernels.rope import apply_rope, rope_naive
from tests.kernels.references import rope_complex


@pytest.mark.parametrize("theta", [1e4, 5e5], ids=["theta1e4", "theta5e5"])
def test_matches_complex_rotation(theta):
    """rope_naive is the complex rotation of each (i, i + D/2) pair, in float64, with positions
    that restart per document and reach a later stage's offsets."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 3, 40, generator=gen, dtype=torch.float64)
    pos = torch.cat([torch.arange(5), torch.arange(11), 2000 + torch.arange(7)])
    # Angles up to ~2e3 rad carry float64 error ~2e3 * 2.2e-16 ~ 5e-13 in either formula
    # (their inv_freq exponents round differently), and |x| < 6: outputs agree to ~3e-12.
    torch.testing.assert_close(
        rope_naive(x, pos, theta), rope_complex(x, pos, theta), rtol=0, atol=1e-11
    )


def test_position_zero_is_identity():
    x = torch.randn(3, 2, 16, dtype=torch.float64)
    y = rope_naive(x, torch.zeros(3, dtype=torch.long), 1e4)
    assert torch.equal(y, x)  # cos 0 = 1 and sin 0 = 0 exactly


def test_scores_depend_only_on_relative_position():
    """<rope(q, m), rope(k, n)> is a function of m - n: shifting both positions changes nothing
    (float64; the rotation is exact up to a few ulps)."""
    q, k = torch.randn(2, 1, 1, 40, dtype=torch.float64)
    m, n = torch.tensor([7]), torch.tensor([3])

    def score(shift: int) -> torch.Tensor:
        return (rope_naive(q, m + shift, 1e4) * rope_naive(k, n + shift, 1e4)).sum()

    torch.testing.assert_close(score(0), score(1000), rtol=1e-12, atol=1e-12)


def test_positions_restart_per_document():
    """Two identical documents packed together, positions restarting: identical outputs."""
    doc = torch.randn(5, 2, 16)
    x = torch.cat([doc, doc])
    pos = torch.cat([torch.arange(5), torch.arange(5)])
    y = apply_rope(x, pos, 1e4)
    assert torch.equal(y[:5], y[5:])


def test_rotation_preserves_norm():
    x = torch.randn(17, 3, 64, dtype=torch.float64)
    y = rope_naive(x, torch.arange(17) * 100, 5e5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_auto_on_cpu_is_the_torch_reference():
    x, pos = torch.randn(17, 2, 16), torch.arange(17)
    assert torch.equal(apply_rope(x, pos, 1e4, backend="auto"), rope_naive(x, pos, 1e4))
    assert torch.equal(apply_rope(x, pos, 1e4, backend="torch"), rope_naive(x, pos, 1e4))


@pytest.mark.parametrize(
    "x, pos, backend, match",
    [
        (torch.randn(4, 2, 15), torch.arange(4), "torch", "even"),
        (torch.randn(4, 16), torch.arange(4), "torch", "T, H, D"),
        (torch.randn(4, 2, 16), torch.arange(5), "torch", "position_ids"),
        (torch.randn(4, 2, 16), torch.arange(4), "cuda", "unknown rope backend"),
    ],
    ids=["odd-D", "2-D", "positions", "backend"],
)
def test_bad_input_raises(x, pos, backend, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(x, pos, 1e4, backend=backend)
