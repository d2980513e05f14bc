"""Activation checkpointing (full, selective) and offload of the checkpointed inputs: the loss
and gradients of the plain model, keeping only what each mode promises to keep."""

import copy

import pytest
import torch

from kernels.attention import VarlenMeta
from longtrain.config import MemoryConfig, ModelConfig
from longtrain.distributed.memory import ActivationOffloader, apply_memory
from longtrain.distributed.memory.checkpointing import ATTENTION_OPS, _op_name
from longtrain.model import build_model
from longtrain.torch_private import TorchDispatchMode

CFG = ModelConfig(
    vocab_size=61,
    dim=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    ffn_dim=48,
    dtype="float64",
    attn_backend="torch",
    kernel_backend="torch",
)
LENGTHS = [7, 30, 13]


def _batch():
    T = sum(LENGTHS)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (T,), generator=gen)
    labels = torch.randint(0, CFG.vocab_size, (T,), generator=gen)
    cu = torch.zeros(len(LENGTHS) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(LENGTHS), 0)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    return tokens, positions, VarlenMeta(cu, cu, max(LENGTHS), max(LENGTHS)), labels


def _loss_and_grads(model):
    tokens, positions, meta, labels = _batch()
    loss = model(tokens, positions, meta, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _stacked(**memory):
    model = build_model(CFG, seed=3)
    apply_memory(model, MemoryConfig(**memory))
    return model


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _op_name(func) in ATTENTION_OPS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "memory",
    [
        {"activation_checkpoint": "full"},
        {"activation_checkpoint": "selective"},
        {"activation_checkpoint": "full", "offload_activations": True},
        {"activation_checkpoint": "selective", "offload_activations": True},
    ],
    ids=["full", "selective", "full-offload", "selective-offload"],
)
def test_checkpointing_is_exact(memory):
    loss_ref, grads_ref = _loss_and_grads(build_model(CFG, seed=3))
    loss, grads = _loss_and_grads(_stacked(**memory))
    # Recomputation repeats the same ops on the same inputs (offload copies them exactly):
    # the results are bitwise identical.
    assert torch.equal(loss, loss_ref)
    for name, g in grads_ref.items():
        assert torch.equal(grads[name], g), name


def test_whole_stack_with_tiles_equals_plain():
    loss_ref, grads_ref = _loss_and_grads(build_model(CFG, seed=3))
    model = _stacked(activation_checkpoint="selective", offload_activations=True, mlp_tiles=4)
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)  # forward tiles are per token
    for name, g in grads_ref.items():
        # MLP weight gradients are summed per tile, then over tiles (reassociation).
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-13, msg=name)


@pytest.mark.parametrize("mode,attention_in_backward", [("full", True), ("selective", False)])
def test_selective_never_recomputes_attention(mode, attention_in_backward):
    model = _stacked(activation_checkpoint=mode)
    tokens, positions, meta, labels = _batch()
    counter = _CountAttention()
    with counter:
        loss = model(tokens, positions, meta, labels)
    forward_calls = counter.calls
    assert forward_calls == CFG.n_layers * len(LENGTHS)  # one CPU flash call per document
    counter.calls = 0
    with counter:
        loss.backward()
    # full: the recompute runs every block's attention again; selective: it reuses them.
    assert counter.calls == (forward_calls if attention_in_backward else 0)


class _Recording(ActivationOffloader):
    def _pack(self, t):
        self.packed = [*getattr(self, "packed", []), (tuple(t.shape), t.dtype)]
        return super()._pack(t)


def test_offload_moves_exactly_the_block_inputs():
    model = build_model(CFG, seed=3)
    T = sum(LENGTHS)
    offloader = _Recording()
    for block in model.layers:
        from longtrain.distributed.memory import checkpoint_block

        checkpoint_block(block, "full", offloader)
    tokens, positions, meta, labels = _batch()
    loss = model(tokens, positions, meta, labels)
    block_inputs = [((T, CFG.dim), torch.float64), ((T,), torch.int64)]
    assert offloader.packed == block_inputs * CFG.n_layers
    loss.backward()
    assert offloader._pending == {}  # every group was unpacked by the backward


def test_full_checkpointing_keeps_only_block_inputs():
    """Saved tensors seen from outside the blocks: all of them without checkpointing, only the
    block inputs with it (the rest is the embedding's and the loss's own)."""

    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        tokens, positions, meta, labels = _batch()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, positions, meta, labels)
        return total[0]

    plain = saved_bytes(build_model(CFG, seed=3))
    full = saved_bytes(_stacked(activation_checkpoint="full"))
    T = sum(LENGTHS)
    per_block_inputs = T * CFG.dim * 8 + T * 8
    assert full < plain / 3
    assert full >= CFG.n_layers * per_block_inputs


def test_state_dict_names_unchanged():
    plain = build_model(CFG, seed=3)
    stacked = _stacked(activation_checkpoint="selective", mlp_tiles=2)
    assert list(stacked.state_dict()) == list(plain.state_dict())
    stacked.load_state_dict(copy.deepcopy(plain.state_dict()))


def test_no_grad_forward_skips_checkpointing():
    model = _stacked(activation_checkpoint="full", offload_activations=True)
    tokens, positions, meta, _ = _batch()
    with torch.no_grad():
        hidden = model(tokens, positions, meta)
    assert hidden.shape == (sum(LENGTHS), CFG.dim)


@pytest.mark.parametrize(
    "memory,message",
    [
        ({"offload_activations": True}, "activation_checkpoint=full or selective"),
        ({"activation_checkpoint": "some"}, "activation_checkpoint='some'"),
        ({"mlp_tiles": -2}, "mlp_tiles=-2"),
        ({"mlp_tiles": 0, "mlp_tile_budget_mib": 0}, "mlp_tile_budget_mib=0"),
        ({"loss_tile_tokens": 0}, "loss_tile_tokens=0"),
    ],
)
def test_bad_settings_are_refused(memory, message):
    with pytest.raises(ValueError, match=message):
        _stacked(**memory)


def test_loss_tile_tokens_reaches_the_tiled_loss(monkeypatch):
    import longtrain.model.llama as llama

    seen = []
    real = llama.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("tile_tokens"))
        return real(*args, **kwargs)

    monkeypatch.setattr(llama, "linear_cross_entropy", spy)
    model = _stacked(loss_tile_tokens=8)
    tokens, positions, meta, labels = _batch()
    model(tokens, positions, meta, labels)
    assert seen == [8]
