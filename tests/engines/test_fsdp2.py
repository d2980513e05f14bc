"""train.engine=fsdp2 with the memory stack under Ulysses or ring sp=2 equals one plain
process, through the trainer's own step (`longtrain.trainer.step.train_step`) and FSDP2 wrapping."""

import pytest
import torch

from longtrain.config import ParallelConfig
from longtrain.distributed import DistEnv
from longtrain.distributed.fsdp2 import apply_fsdp2
from longtrain.distributed.memory import apply_memory
from longtrain.model import build_model
from longtrain.trainer.optimizer import build_optimizer, build_scheduler
from longtrain.trainer.step import StepContext, train_step
from tests.engines.harness import PAD_ID, full_parameters, reference, run_config, sequences
from tests.spawn import spawn

STEPS = 2
STACK = {
    "mlp_tiles": 3,
    "activation_checkpoint": "selective",
    "offload_activations": True,
    "loss_tile_tokens": 8,
}


METHODS = {"ulysses": {"ulysses": 2}, "ring": {"ring": 2}}


def _worker(rank: int, world_size: int) -> dict:
    return {method: _run(rank, world_size, method) for method in METHODS}


def _run(rank: int, world_size: int, method: str) -> dict:
    import parallel

    cfg = run_config(**STACK)
    cfg.parallel = ParallelConfig(method=method, **METHODS[method])
    dims = parallel.ParallelDims(world_size, **METHODS[method])
    dims.validate(cfg.model.n_heads, cfg.model.n_kv_heads, cfg.data.seq_len)
    dims.build_mesh("cpu")
    model = build_model(cfg.model, seed=0)
    # The trainer's order: sequence parallel -> memory stack -> FSDP2.
    parallel.apply(model, dims, cfg.parallel)
    apply_memory(model, cfg.train.memory)
    apply_fsdp2(model, DistEnv(rank, world_size, 0, torch.device("cpu")))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, STEPS)
    ctx = StepContext(
        torch.device("cpu"), cfg.model.dtype, cfg.optim.grad_clip, PAD_ID, dims=dims,
        parallel_cfg=cfg.parallel, dp_group=dims.dp_group,
    )  # fmt: skip
    records = [
        train_step(model, optimizer, scheduler, sequences(step, 1), ctx) for step in range(STEPS)
    ]
    return {
        "losses": [(r["loss"], r["grad_norm"]) for r in records],
        "params": full_parameters(model),
    }


@pytest.mark.distributed
def test_sp2_fsdp2_with_memory_stack_equals_one_process():
    ref_losses, ref_params = reference(run_config(), STEPS, per_step=1)
    for r in [by_method[m] for by_method in spawn(_worker, 2, timeout=300) for m in METHODS]:
        # float64 throughout (FSDP2 reduces in the parameters' dtype). Ulysses splits the
        # sequence and tiles split the MLP: sums over tokens reassociate (~1e-16 relative per
        # addition); AdamW amplifies gradient errors by at most lr / eps = 10 per step.
        for (loss, norm), (ref_loss, ref_norm) in zip(r["losses"], ref_losses, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-12, abs=0)
            assert norm == pytest.approx(ref_norm, rel=1e-12, abs=0)
        for name, p in ref_params.items():
            torch.testing.assert_close(r["params"][name], p, rtol=0, atol=1e-13, msg=name)
