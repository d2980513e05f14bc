"""Meta-device start (`longtrain.distributed.meta_start`): the model is built on meta,
parallelised and sharded there, and each rank materialises only its shards; the full model is
the one a single process builds from the same seed, whatever the layout, and trains alike."""

import pytest
import torch

from longtrain.config import ParallelConfig
from longtrain.distributed import DistEnv
from longtrain.distributed.meta_start import build_parallel_model
from longtrain.distributed.parallelize import build_parallel_dims
from longtrain.model import build_model
from longtrain.trainer.optimizer import build_optimizer, build_scheduler
from longtrain.trainer.step import train_step
from tests.engines.harness import PAD_ID, reference, run_config, sequences
from tests.spawn import spawn

CPU = torch.device("cpu")


def _meta_start(rank: int, world: int, method: str, ulysses: int, steps: int):
    from torch.distributed.tensor import DTensor

    cfg = run_config()
    cfg.train.engine = "fsdp2"
    cfg.parallel = ParallelConfig(method=method, ulysses=ulysses)
    env = DistEnv(rank, world, rank, CPU)
    dims = build_parallel_dims(cfg, env)
    model, ctx = build_parallel_model(cfg, env, dims, pad_id=PAD_ID)
    local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    full = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    dp = world // ulysses
    losses = [
        train_step(model, optimizer, scheduler, sequences(step, 2)[rank // ulysses :: dp], ctx)
        for step in range(steps)
    ]
    return full, local, sharded, [(r["loss"], r["grad_norm"]) for r in losses]


@pytest.mark.distributed
# Ulysses 2 over 2 ranks: FSDP2 over the SP ranks, the sharding a long-sequence run has.
@pytest.mark.parametrize(("method", "ulysses"), [("ulysses", 2)])
def test_meta_start_gives_the_one_process_model_and_trains_alike(method, ulysses):
    cfg = run_config()
    want = build_model(cfg.model, seed=cfg.train.seed)
    expected, _ = reference(cfg, steps=2, per_step=2)
    results = spawn(_meta_start, 2, method, ulysses, 2, timeout=300)
    for full, local, sharded, losses in results:
        assert sharded
        assert full.keys() == dict(want.named_parameters()).keys()
        for name, p in want.named_parameters():
            # The same draws from the same generator, sliced: bit for bit.
            assert torch.equal(full[name], p.detach()), name
        # Each rank materialised half of every tensor (dim 0 split in two, rounded up).
        for name, p in want.named_parameters():
            assert local[name] <= -(-p.shape[0] // 2) * p[0].numel(), name
        for (loss, norm), (want_loss, want_norm) in zip(losses, expected):
            # float64: sharding only reassociates the gradient sums (1e-9, DESIGN.md).
            assert loss == pytest.approx(want_loss, rel=1e-9, abs=0)
            assert norm == pytest.approx(want_norm, rel=1e-9, abs=0)


def test_one_process_meta_start_equals_building_in_place():
    cfg = run_config()
    env = DistEnv(0, 1, 0, CPU)
    model, _ = build_parallel_model(cfg, env, build_parallel_dims(cfg, env), pad_id=PAD_ID)
    want = build_model(cfg.model, seed=cfg.train.seed)
    for (name, p), (_, q) in zip(model.named_parameters(), want.named_parameters()):
        assert p.device == CPU and p.dtype == torch.float64
        assert torch.equal(p, q), name
