"""torch.compile traces through the Triton ops of RoPE, RMSNorm, the LSE merge and the fused
loss without a graph break: each is a `torch.library` custom op with a fake implementation,
wrapped in an autograd.Function (the attention ops are checked in test_triton_attn.py).

Backend `aot_eager`: dynamo and AOTAutograd trace forward and backward through the fake
implementations, then run the real ops eagerly, so results equal eager mode exactly.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels.attention.triton_merge import triton_merge_attn_partials
from kernels.loss.triton_ce import triton_linear_cross_entropy
from kernels.norm.triton_norm import rms_norm_triton
from kernels.rope.triton_rope import rope_triton
from tests.kernels.triton.helpers import DEVICE


def test_fullgraph_forward_and_backward_equal_eager():
    T, H, D, V = 17, 2, 16, 300
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, D, generator=gen).to(DEVICE).requires_grad_()
    w_norm = torch.ones(D, device=DEVICE).requires_grad_()
    w_out = (0.1 * torch.randn(V, H * D, generator=gen)).to(DEVICE).requires_grad_()
    lse_a, lse_b = torch.randn(2, H, T, generator=gen).to(DEVICE)
    pos = torch.arange(T, device=DEVICE)
    labels = torch.randint(0, V, (T,), generator=gen).to(DEVICE)

    def f(x, w_norm, w_out):
        y = rope_triton(rms_norm_triton(x, w_norm, 1e-5), pos, 1e4)
        merged, lse = triton_merge_attn_partials(y, lse_a, x, lse_b)
        loss = triton_linear_cross_entropy(merged.reshape(T, H * D), w_out, labels, None)
        return loss + lse.sum()

    params = (x, w_norm, w_out)
    eager = f(*params)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    traced = compiled(*params)
    traced_grads = torch.autograd.grad(traced, params)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)  # same kernels, same data
    for a, b in zip(traced_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
