"""model.dtype=bfloat16 is bf16 compute over float32 master weights on every engine
(`longtrain.distributed.precision`): the blocks see bf16 activations, the parameters, their
gradients and the optimizer state stay float32, and no bf16 copy of a weight outlives the op
that made it when blocks are checkpointed. Accuracy against float64 per layout:
tests/engines/test_bf16_accuracy.py."""

import math
import weakref

import pytest
import torch

from longtrain.config import ParallelConfig
from longtrain.distributed import DistEnv
from longtrain.distributed.parallelize import build_parallel_dims, parallelize
from longtrain.distributed.precision import (
    check_bf16_device,
    describe_precision,
    engine_casts_params,
    uses_autocast,
)
from longtrain.errors import ConfigError
from longtrain.model import build_model
from longtrain.torch_private import TorchDispatchMode
from longtrain.trainer.optimizer import build_optimizer, build_scheduler
from longtrain.trainer.step import forward_loss, shard_micro_batch, train_step
from tests.engines.harness import PAD_ID, reference, run_config, sequences
from tests.spawn import spawn

CPU = torch.device("cpu")


def bf16_config(**memory):
    cfg = run_config(**memory)
    cfg.model.dtype = "bfloat16"
    return cfg


def _block_input_dtypes(model) -> list:
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    return seen


class _WeightCasts(TorchDispatchMode):
    """Weak references to every copy of a parameter made while active (autocast's casts)."""

    def __init__(self, params) -> None:
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.copies: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is torch.ops.aten._to_copy.default and source.data_ptr() in self.ptrs:
            self.copies.append(weakref.ref(out))
        return out


def _one_process(cfg):
    env = DistEnv(0, 1, 0, CPU)
    model = build_model(cfg.model, seed=0)
    model, ctx = parallelize(model, build_parallel_dims(cfg, env), cfg, env, pad_id=PAD_ID)
    return model, ctx


def test_one_process_autocasts_over_float32_weights_with_a_bf16_residual_stream():
    cfg = bf16_config(activation_checkpoint="full")
    model, ctx = _one_process(cfg)
    assert ctx.autocast  # no engine casts the weights: autocast does, op by op
    dtypes = _block_input_dtypes(model)
    local = shard_micro_batch(sequences(0, 1)[0], ctx)
    casts = _WeightCasts(model.parameters())
    alive_at_the_head = []
    model.norm.register_forward_hook(
        lambda *_: alive_at_the_head.append(sum(ref() is not None for ref in casts.copies))
    )
    with casts:
        loss = forward_loss(model, local, ctx)
    # Checkpointed blocks keep only their inputs; autocast's cache would keep a bf16 copy of
    # every block's weights until the forward ends (the planner saw ~0.42 GiB per 8B layer).
    assert len(casts.copies) >= 7 * cfg.model.n_layers  # the casts happened, in every block
    assert alive_at_the_head == [0]
    loss.backward()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert loss.dtype == torch.float32  # the tiled loss accumulates in float32
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


def test_bf16_step_trains_close_to_float64():
    """Two optimizer steps in bf16 follow the float64 run: bf16 keeps 8 mantissa bits, so a
    loss of ~4 carries ~4 x 2^-8 / sqrt(tokens) of rounding per op; 1e-2 relative bounds it
    with room, and a wrong path (no update, fp32 weights lost) moves it by far more."""
    cfg = bf16_config()
    model, ctx = _one_process(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 2)
    losses = [train_step(model, optimizer, scheduler, sequences(s, 2), ctx)["loss"] for s in (0, 1)]
    ref_losses, _ = reference(run_config(), 2, per_step=2)
    for loss, (ref, _norm) in zip(losses, ref_losses, strict=True):
        assert loss == pytest.approx(ref, rel=1e-2)
    states = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)


def test_which_engine_casts_the_weights():
    assert engine_casts_params("bfloat16", "fsdp2", 2)
    assert engine_casts_params("bfloat16", "deepspeed", 1)
    assert not engine_casts_params("bfloat16", "fsdp2", 1)  # one process: no FSDP2
    assert uses_autocast("bfloat16", "none", 4) and uses_autocast("bfloat16", "fsdp2", 1)
    for exact in ("float32", "float64"):  # exact paths: no casts at all
        assert not engine_casts_params(exact, "fsdp2", 2) and not uses_autocast(exact, "none", 1)
    assert "FSDP2 gathers bf16" in describe_precision("bfloat16", "fsdp2", 8)
    assert "autocast" in describe_precision("bfloat16", "fsdp2", 1)
    assert describe_precision("float64", "none", 1) == "precision: float64 throughout (exact path)"


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 has no bf16 support"):
        check_bf16_device("bfloat16", torch.device("cuda", 0))
    check_bf16_device("float32", torch.device("cuda", 0))  # fp32 asks nothing of the GPU
    check_bf16_device("bfloat16", CPU)  # CPUs compute bf16 (in software where they must)


# --------------------------------------------------------------------------------------------
# Two processes: FSDP2 with Ulysses 2, and DeepSpeed ZeRO 1/2/3


def _fsdp2_worker(rank: int, world_size: int) -> dict:
    cfg = bf16_config(activation_checkpoint="full", offload_activations=True)
    cfg.parallel = ParallelConfig(method="ulysses", ulysses=2)
    env = DistEnv(rank, world_size, 0, CPU)
    model = build_model(cfg.model, seed=0)
    model, ctx = parallelize(model, build_parallel_dims(cfg, env), cfg, env, pad_id=PAD_ID)
    dtypes = _block_input_dtypes(model)
    seen_weights = []
    model.layers[0].attn.wq.register_forward_pre_hook(
        lambda m, args: seen_weights.append(m.weight.dtype)
    )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 2)
    records = [train_step(model, optimizer, scheduler, sequences(s, 1), ctx) for s in (0, 1)]
    states = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    return {
        "autocast": ctx.autocast,
        "block_inputs": sorted({str(d) for d in dtypes}),
        "weights_in_forward": sorted({str(d) for d in seen_weights}),
        "params": sorted({str(p.dtype) for p in model.parameters()}),
        "optimizer": sorted({str(t.dtype) for t in states}),
        "losses": [r["loss"] for r in records],
    }


@pytest.mark.distributed
def test_fsdp2_gathers_bf16_and_keeps_float32_shards():
    ref_losses, _ = reference(run_config(), 2, per_step=1)
    for r in spawn(_fsdp2_worker, 2, timeout=300):
        assert not r["autocast"]  # FSDP2 hands the forward bf16 weights
        assert r["weights_in_forward"] == ["torch.bfloat16"]
        assert r["block_inputs"] == ["torch.bfloat16"]
        assert r["params"] == ["torch.float32"] and r["optimizer"] == ["torch.float32"]
        for loss, (ref, _norm) in zip(r["losses"], ref_losses, strict=True):
            assert math.isfinite(loss) and loss == pytest.approx(ref, rel=1e-2)  # as above


def _deepspeed_worker(rank: int, world_size: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from longtrain.distributed.deepspeed_zero import build_deepspeed
    from tests.engines.harness import deepspeed_step, deepspeed_worker_setup, one_process_context

    deepspeed_worker_setup(rank)
    out = {}
    for stage in (1, 2, 3):
        cfg = bf16_config()
        cfg.train.engine = "deepspeed"
        cfg.train.deepspeed.zero_stage = stage
        model = build_model(cfg.model, seed=0)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, 2)
        run = build_deepspeed(model, optimizer, cfg, world_size)
        ctx = one_process_context(cfg)
        losses = [
            deepspeed_step(run, scheduler, sequences(s, world_size)[rank : rank + 1], ctx)[0]
            for s in (0, 1)
        ]
        p = run.module.layers[0].attn.wq.weight
        out[stage] = (losses, str(p.dtype), str(safe_get_full_fp32_param(p).dtype))
    return out


@pytest.mark.distributed
def test_deepspeed_bf16_section_keeps_float32_masters():
    pytest.importorskip("deepspeed")
    ref_losses, _ = reference(run_config(), 2, per_step=2)
    for per_stage in spawn(_deepspeed_worker, 2, timeout=400):
        for stage, (losses, module_dtype, master_dtype) in per_stage.items():
            assert (module_dtype, master_dtype) == ("torch.bfloat16", "torch.float32"), stage
            for loss, (ref, _norm) in zip(losses, ref_losses, strict=True):
                assert loss == pytest.approx(ref, rel=1e-2), stage  # as in the tests above
