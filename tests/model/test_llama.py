"""The model on packed batches: documents never see each other, and the tiled loss is the
loss of materialised logits."""

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import VarlenMeta
from longtrain.config import ModelConfig
from longtrain.model import build_model, param_count
from tests.helpers import cu_seqlens

CFG = ModelConfig(
    vocab_size=61,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=48,
    dtype="float64",
    attn_backend="torch",
    kernel_backend="torch",
)


def _meta(lengths):
    cu = cu_seqlens(lengths)
    return VarlenMeta(cu, cu, max(lengths), max(lengths))


def _positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


@pytest.mark.parametrize(
    "lengths", [[1, 7, 33], [20, 5], [64]], ids=lambda ls: "L" + "-".join(map(str, ls))
)
def test_packed_batch_equals_each_document_alone(lengths):
    model = build_model(CFG, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (sum(lengths),), generator=gen)
    packed = model(tokens, _positions(lengths), _meta(lengths))
    alone = []
    for doc in torch.split(tokens, lengths):
        alone.append(model(doc, torch.arange(len(doc)), _meta([len(doc)])))
    # float64 and the same per-document arithmetic: only blockwise reassociation differs.
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-12, atol=1e-12)


def test_forward_loss_is_weighted_sum_of_token_cross_entropy():
    model = build_model(CFG, seed=2)
    lengths = [9, 16]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (25,), generator=gen)
    labels = torch.randint(0, CFG.vocab_size, (25,), generator=gen)
    labels[[3, 8, 24]] = -100
    weights = torch.rand(25, generator=gen, dtype=torch.float64)
    weights[labels == -100] = 0
    loss = model(tokens, _positions(lengths), _meta(lengths), labels, weights)
    hidden = model(tokens, _positions(lengths), _meta(lengths))
    ce = F.cross_entropy(model.logits(hidden), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, (ce * weights).sum(), rtol=1e-12, atol=1e-12)


def test_param_count_matches_module():
    for tie in (False, True):
        cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
        model = build_model(cfg, seed=0)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_init_is_deterministic_and_dtype_independent():
    a = build_model(CFG, seed=5)
    b = build_model(ModelConfig(**{**CFG.__dict__, "dtype": "float32"}), seed=5)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        # float32 init cast to float64: identical values.
        assert torch.equal(pa, pb.double()), name


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of model.n_kv_heads"):
        build_model(ModelConfig(**{**CFG.__dict__, "n_kv_heads": 3}), seed=0)


def test_bf16_autocast_loss_is_close_to_float32():
    cfg = ModelConfig(**{**CFG.__dict__, "dtype": "float32"})
    model = build_model(cfg, seed=3)
    lengths = [40, 24]
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab_size, (64,), generator=gen)
    labels = torch.roll(tokens, -1)
    args = (tokens, _positions(lengths), _meta(lengths), labels)
    ref = model(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(*args)
    low.backward()
    assert low.dtype == torch.float32  # the tiled loss keeps its own float32 precision
    # bf16 matmuls carry ~3 significant digits; two layers keep the loss within 2%.
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
