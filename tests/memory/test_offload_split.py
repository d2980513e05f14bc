"""`train.memory.offload_activations` as a count or a fraction: how it resolves, which blocks
offload, that a partly offloaded model computes exactly what the plain one does, and the
pinned pieces an offloaded tensor is copied into on CUDA."""

import pytest
import torch

from longtrain.config import MemoryConfig
from longtrain.config.rules import check_memory, offloaded_blocks
from longtrain.distributed.memory import ActivationOffloader, apply_memory
from longtrain.distributed.memory.checkpointing import (
    PIECE_MIN_BYTES,
    from_pieces,
    pinned_host_bytes,
    pinned_pieces,
    to_pieces,
)
from longtrain.errors import ConfigError
from longtrain.model import build_model
from tests.memory.test_checkpointing import CFG, LENGTHS, _batch, _loss_and_grads

N = CFG.n_layers  # 3


def _memory(value) -> MemoryConfig:
    return MemoryConfig(activation_checkpoint="full", offload_activations=value)


@pytest.mark.parametrize(
    "value,n_layers,count",
    [
        (False, 32, 0),
        (True, 32, 32),
        (0, 32, 0),
        (12, 32, 12),
        (32, 32, 32),
        (0.5, 32, 16),
        (0.5, 5, 3),  # 2.5 rounds half up
        (0.3, 5, 2),  # 1.5 -> 2
        (0.25, 5, 1),  # 1.25 -> 1
        (0.0, 32, 0),
        (1.0, 32, 32),  # the float 1.0 is every block; the int 1 is one block
        (1, 32, 1),
    ],
)
def test_offloaded_blocks_resolves_counts_and_fractions(value, n_layers, count):
    assert offloaded_blocks(_memory(value), n_layers) == count


@pytest.mark.parametrize(
    "value,message",
    [
        (33, "offload_activations=33 is above the model's 32 blocks"),
        (-1, "offload_activations=-1 must be >= 0"),
        (1.5, "offload_activations=1.5 must be a fraction of the blocks in \\[0, 1\\]"),
        (float("nan"), "must be a fraction"),
        ("some", "expected true, false, a count of blocks"),
    ],
)
def test_bad_offload_values_are_one_line_config_errors(value, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_memory(_memory(value), 32)
    assert "\n" not in str(err.value)


def test_a_count_needs_checkpointing_but_zero_does_not():
    with pytest.raises(ConfigError, match="activation_checkpoint=full or selective"):
        check_memory(MemoryConfig(offload_activations=2))
    check_memory(MemoryConfig(offload_activations=0))  # nothing offloaded: nothing to refuse
    check_memory(MemoryConfig(offload_activations=0.0))


@pytest.mark.parametrize("value,count", [(0, 0), (1, 1), (2, 2), (True, 3), (0.5, 2)])
def test_the_first_blocks_offload_and_the_rest_only_checkpoint(value, count):
    model = build_model(CFG, seed=3)
    offloader = apply_memory(model, _memory(value))
    offloading = [block._offloader is not None for block in model.layers]
    assert offloading == [i < count for i in range(N)]
    assert all(block._ac_mode == "full" for block in model.layers)
    assert (offloader is None) == (count == 0)
    assert all(block._offloader in (None, offloader) for block in model.layers)


def test_apply_memory_refuses_more_blocks_than_the_model_has():
    with pytest.raises(ConfigError, match="offload_activations=4 is above the model's 3 blocks"):
        apply_memory(build_model(CFG, seed=3), _memory(4))


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("count", [1, 2])
def test_part_offloaded_equals_none_offloaded(mode, count):
    """float64: offload copies block inputs exactly and recomputation repeats the same ops on
    the same values, so k of n offloaded gives bitwise the loss and gradients of none."""
    reference = build_model(CFG, seed=3)
    apply_memory(reference, MemoryConfig(activation_checkpoint=mode))
    loss_ref, grads_ref = _loss_and_grads(reference)
    model = build_model(CFG, seed=3)
    apply_memory(model, MemoryConfig(activation_checkpoint=mode, offload_activations=count))
    loss, grads = _loss_and_grads(model)
    assert torch.equal(loss, loss_ref)
    for name, g in grads_ref.items():
        assert torch.equal(grads[name], g), name


class _Recording(ActivationOffloader):
    def _pack(self, t):
        self.packed = [*getattr(self, "packed", []), tuple(t.shape)]
        return super()._pack(t)


def test_only_the_offloaded_blocks_pack_their_inputs():
    model = build_model(CFG, seed=3)
    apply_memory(model, _memory(2))
    recording = _Recording()
    for block in model.layers[:2]:
        block._offloader = recording
    tokens, positions, meta, labels = _batch()
    model(tokens, positions, meta, labels).backward()
    T = sum(LENGTHS)
    assert recording.packed == [(T, CFG.dim), (T,)] * 2  # x and position ids of blocks 0, 1
    assert recording._pending == {}


@pytest.mark.parametrize(
    "nbytes", [1, 100, PIECE_MIN_BYTES, PIECE_MIN_BYTES + 1, 5 * (1 << 30) + 12345, 3 << 20]
)
def test_pinned_pieces_are_powers_of_two_wasting_at_most_one_piece(nbytes):
    pieces = pinned_pieces(nbytes)
    assert all(p & (p - 1) == 0 for p in pieces)  # what the caching host allocator keeps
    assert pieces == sorted(pieces, reverse=True)
    assert nbytes <= sum(pieces) == pinned_host_bytes(nbytes)
    assert sum(pieces) - nbytes < max(PIECE_MIN_BYTES, nbytes)  # one MiB, or below 2x
    if nbytes > PIECE_MIN_BYTES:
        assert sum(pieces) - nbytes < PIECE_MIN_BYTES


@pytest.mark.parametrize("shape,dtype", [((3000, 777), torch.bfloat16), ((5,), torch.int64)])
def test_pieces_round_trip_exactly(shape, dtype):
    x = (torch.randn(shape) * 100).to(dtype)
    pieces = to_pieces(x, pin=False)  # the CUDA path pins them; the bytes are the same
    assert [p.numel() for p in pieces] == pinned_pieces(x.numel() * x.element_size())
    y = from_pieces(pieces, x, torch.device("cpu"), non_blocking=False)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(x, y)
