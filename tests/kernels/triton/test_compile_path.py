"""While `torch.compiler.is_compiling()`, every kernel goes straight to its custom op, whose
fake implementation takes tensors of any device: no device or interpreter check runs then.
torch.compile relies on it, and so does the planner, which simulates a CUDA run on fake CPU
tensors without setting TRITON_INTERPRET. The device check runs where a kernel really runs.

Legend (kernels/__init__.py): T tokens, Hq query heads, K key/value heads, D head dim,
E model width, V vocabulary.
"""

import pytest
import torch

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode

# Imported here, while TRITON_INTERPRET is still set: `triton.jit` reads it when a kernel
# module is first imported, and the tests below unset it.
import kernels.attention.triton_attn
import kernels.loss.triton_ce
import kernels.norm.triton_norm
import kernels.rope.triton_rope  # noqa: F401
from kernels.attention import attn_varlen, attn_varlen_bwd, attn_varlen_fwd
from kernels.loss import linear_cross_entropy
from kernels.norm import rms_norm
from kernels.rope import apply_rope
from tests.helpers import cu_seqlens


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def compiling(monkeypatch, no_interpreter):
    """What torch.compile's tracing (and the planner) look like to our kernels."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_fused_ops_on_fake_cpu_tensors(compiling):
    T, Hq, D, V = 17, 2, 16, 50
    with FakeTensorMode():
        x_THD = torch.randn(T, Hq, D, requires_grad=True)
        w_D = torch.ones(D, requires_grad=True)
        weight_VE = torch.randn(V, Hq * D, requires_grad=True)
        y_THD = rms_norm(x_THD, w_D, 1e-5, backend="triton")
        y_THD = apply_rope(y_THD, torch.arange(T), 1e4, backend="triton")
        labels_T = torch.zeros(T, dtype=torch.long)
        loss = linear_cross_entropy(y_THD.reshape(T, Hq * D), weight_VE, labels_T, backend="triton")
        loss.backward()
    assert x_THD.grad.shape == x_THD.shape and weight_VE.grad.shape == weight_VE.shape
    assert w_D.grad.shape == w_D.shape and loss.shape == ()


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "flash_attn"])
def test_attention_on_fake_cpu_tensors(compiling, backend):
    """Even `flash_attn`, which needs CUDA where it runs: the backend is resolved only there."""
    cu = cu_seqlens([5, 12])  # real, as the planner's document boundaries are
    with FakeTensorMode(allow_non_fake_inputs=True):
        q_THD = torch.randn(17, 4, 16, requires_grad=True)
        k_TKD, v_TKD = (torch.randn(17, 2, 16, requires_grad=True) for _ in range(2))
        out_THD, lse_HT = attn_varlen(q_THD, k_TKD, v_TKD, cu, cu, 12, 12, backend=backend)
        (out_THD.sum() + lse_HT.sum()).backward()
        out_THD, lse_HT = attn_varlen_fwd(q_THD, k_TKD, v_TKD, cu, cu, 12, 12, backend=backend)
        dout_THD = torch.randn(17, 4, 16)
        args = (dout_THD, q_THD, k_TKD, v_TKD, out_THD, lse_HT, cu, cu, 12, 12)
        grads = attn_varlen_bwd(*args, backend=backend)
    assert (out_THD.shape, lse_HT.shape, lse_HT.dtype) == ((17, 4, 16), (4, 17), torch.float32)
    assert not out_THD.requires_grad  # attn_varlen_fwd stays outside autograd while compiling
    assert [g.shape for g in grads] == [(17, 4, 16), (17, 2, 16), (17, 2, 16)]
    assert q_THD.grad.shape == q_THD.shape and k_TKD.grad.shape == k_TKD.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors are refused without a GPU")
def test_running_on_cpu_without_interpreter_is_refused(no_interpreter):
    """Eagerly the real implementation runs, and checks the device before it launches."""
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.randn(4, 16), torch.ones(16), backend="triton")
    q_THD, k_TKD = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attn_varlen(q_THD, k_TKD, k_TKD, cu_seqlens([5]), cu_seqlens([5]), 5, 5, backend="triton")
