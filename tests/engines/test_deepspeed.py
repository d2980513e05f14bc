"""train.engine=deepspeed: ZeRO 1/2/3 (with optimizer offload) equal one plain process in
float64; under Ulysses sp=2 with the whole memory stack too; and a saved engine resumes to
the very same numbers."""

import math
from importlib.util import find_spec

import pytest
import torch

from longtrain.config import ParallelConfig
from longtrain.config.rules import check_deepspeed
from longtrain.distributed.deepspeed_zero import deepspeed_config
from longtrain.distributed.memory import apply_memory
from longtrain.model import build_model
from longtrain.trainer.optimizer import build_optimizer, build_scheduler
from longtrain.trainer.step import StepContext, train_step
from tests.engines.harness import (
    PAD_ID,
    deepspeed_step,
    deepspeed_worker_setup,
    full_parameters,
    reference,
    run_config,
    sequences,
)
from tests.spawn import spawn

# The equivalence runs need DeepSpeed itself (`make test` installs it); the config and
# layout checks below do not.
needs_deepspeed = pytest.mark.skipif(
    find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed: pip install --no-build-isolation -e '.[deepspeed]'",
)
STEPS = 2
# (stage, optimizer offload); ZeRO-3 with offload runs in the Ulysses test below.
# ZeRO-1 shares ZeRO-2's optimizer (stage_1_and_2) and runs end to end in
# test_deepspeed_universal.py (resumed at ZeRO-1 on the losses of a ZeRO-2 run): left out
# here for the suite's time (each engine costs ~10 s on 2 CPU cores).
ZERO_CASES = [(2, True), (3, False)]
STACK = {
    "mlp_tiles": 3,
    "activation_checkpoint": "selective",
    "offload_activations": True,
    "loss_tile_tokens": 8,
}

# The model runs in float64, but DeepSpeed reduces gradients in float32 whatever the
# parameter dtype (communication_data_type knows fp16, bf16 and fp32 only): a few float32
# roundings (cast, sum, average), ~2^-22 relative, on every gradient and on the norm.
NORM_RTOL = 1e-6
# AdamW amplifies a gradient error by at most lr / eps = 10 (see harness.run_config): two
# steps of |g| <= ~1 give parameter errors below 2 x 10 x 2^-22 ~ 5e-6 (seen: ~1.5e-7).
PARAM_ATOL = 5e-6
# Step 1's loss is computed before any update: only sequence sharding reassociates it.
# Step 2's loss moves with the parameters: ~|dloss/dp| x 1e-7 ~ 1e-10 relative (seen 1e-11).
LOSS_RTOL = 1e-8


def _check(losses, params, ref_losses, ref_params, label):
    for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses, strict=True):
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL, abs=0), label
        assert norm == pytest.approx(ref_norm, rel=NORM_RTOL, abs=0), label
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=0, atol=PARAM_ATOL, msg=f"{label} {name}")


def _engine(model, cfg, world_size, steps):
    from longtrain.distributed.deepspeed_zero import build_deepspeed

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    return build_deepspeed(model, optimizer, cfg, world_size), scheduler


def _zero_worker(rank: int, world_size: int) -> dict:
    """dp = 2: each rank trains its own sequence of every step; then one more step on the
    ZeRO-2 engine (`_nonfinite_step`)."""
    deepspeed_worker_setup(rank)
    out = {}
    for stage, offload in ZERO_CASES:
        cfg = run_config()
        cfg.train.engine = "deepspeed"
        cfg.train.deepspeed.zero_stage = stage
        cfg.train.deepspeed.offload_optimizer = offload
        run, scheduler = _engine(build_model(cfg.model, seed=0), cfg, world_size, STEPS)
        ctx = StepContext(torch.device("cpu"), cfg.model.dtype, cfg.optim.grad_clip, PAD_ID)
        losses = [
            deepspeed_step(run, scheduler, sequences(step, world_size)[rank : rank + 1], ctx)
            for step in range(STEPS)
        ]
        out[(stage, offload)] = (losses, full_parameters(run.module, stage))
        if stage == 2:  # its engine is reused rather than built again (~10 s on 2 cores)
            out["nonfinite"] = _nonfinite_step(run, scheduler, ctx, world_size, rank)
    from deepspeed.comm import comm

    out["shm_comm_op"] = comm.cdb.shm_comm_op  # what build_deepspeed keeps from compiling
    return out


def _nonfinite_step(run, scheduler, ctx, world_size: int, rank: int) -> tuple[dict, bool]:
    """A step whose loss (and so every gradient) is NaN, through `train_step` on a ZeRO-2
    engine: returns its metrics line and whether every parameter stayed as it was."""
    before = full_parameters(run.module, 2)
    (mb,) = sequences(STEPS, world_size)[rank : rank + 1]
    mb.loss_weights = torch.full_like(mb.loss_weights, float("nan"))
    ctx.engine = run
    record = train_step(run.engine, run.engine.optimizer, scheduler, [mb], ctx)
    after = full_parameters(run.module, 2)
    return record, all(torch.equal(before[n], after[n]) for n in before)


@needs_deepspeed
@pytest.mark.distributed
def test_zero_stages_equal_one_process():
    ref_losses, ref_params = reference(run_config(), STEPS, per_step=2)
    per_rank = spawn(_zero_worker, 2, timeout=400)
    for case in ZERO_CASES:
        for results in per_rank:
            _check(*results[case], ref_losses, ref_params, f"stage, offload = {case}")
    for results in per_rank:  # ZeRO's own check skipped the update; train_step reports it
        record, unchanged = results["nonfinite"]
        assert record["skipped"] and unchanged and math.isnan(record["loss"])
        assert results["shm_comm_op"] is None  # no shared-memory op compiled on CPU


def _sp_worker(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """Ulysses sp = 2 (dp = 1), ZeRO-3 with optimizer offload and the memory stack; then a
    save after step 1 and a fresh engine that loads it and redoes step 2."""
    import parallel

    deepspeed_worker_setup(rank)
    cfg = run_config(**STACK)
    cfg.parallel = ParallelConfig(method="ulysses", ulysses=2)
    cfg.train.engine = "deepspeed"
    cfg.train.deepspeed.zero_stage = 3
    cfg.train.deepspeed.offload_optimizer = True
    dims = parallel.ParallelDims(world_size, ulysses=2)
    dims.validate(cfg.model.n_heads, cfg.model.n_kv_heads, cfg.data.seq_len)
    dims.build_mesh("cpu")
    ctx = StepContext(
        torch.device("cpu"), cfg.model.dtype, cfg.optim.grad_clip, PAD_ID, dims=dims,
        parallel_cfg=cfg.parallel, dp_group=dims.dp_group,
    )  # fmt: skip

    def fresh():
        model = build_model(cfg.model, seed=0)
        parallel.apply(model, dims, cfg.parallel)
        apply_memory(model, cfg.train.memory)
        return _engine(model, cfg, world_size, STEPS)

    run, scheduler = fresh()
    losses = [deepspeed_step(run, scheduler, sequences(0, 1), ctx)]
    run.save(f"{ckpt_dir}/step_1")
    losses.append(deepspeed_step(run, scheduler, sequences(1, 1), ctx))
    params = full_parameters(run.module, 3)

    resumed, scheduler = fresh()
    resumed.load(f"{ckpt_dir}/step_1")
    scheduler.step()  # the trainer restores the scheduler from its own checkpoint file
    resumed_loss = deepspeed_step(resumed, scheduler, sequences(1, 1), ctx)
    return {
        "losses": losses,
        "params": params,
        "resumed_loss": resumed_loss,
        "resumed_params": full_parameters(resumed.module, 3),
    }


@needs_deepspeed
@pytest.mark.distributed
def test_ulysses_sp2_zero3_offload_with_memory_stack_equals_one_process_and_resumes(tmp_path):
    ref_losses, ref_params = reference(run_config(), STEPS, per_step=1)
    per_rank = spawn(_sp_worker, 2, str(tmp_path), timeout=400)
    for r in per_rank:
        _check(r["losses"], r["params"], ref_losses, ref_params, "ulysses 2, ZeRO-3, stack")
        # The resumed engine redoes step 2 from the same state: bitwise the same.
        assert r["resumed_loss"] == r["losses"][1]
        for name, p in r["params"].items():
            assert torch.equal(r["resumed_params"][name], p), name


def test_config_from_hydra_fields():
    cfg = run_config()
    cfg.train.deepspeed.zero_stage = 3
    cfg.train.deepspeed.offload_optimizer = True
    ds = deepspeed_config(cfg, world_size=8, block_numel=3 << 20, on_cuda=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_max_live_parameters"] == 2 * (3 << 20)  # two blocks, as the planner
    assert "offload_param" not in zero
    assert ds["managed_gradient_accumulation"] is False
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["train_batch_size"] == 8


@pytest.mark.parametrize(
    "stage,offload_params,cpu_offload,message",
    [
        (4, False, False, "zero_stage=4"),
        (2, True, False, "offload_params=true needs zero_stage=3"),
        (3, False, True, "train.memory.cpu_offload is the FSDP2 switch"),
    ],
)
def test_bad_settings_are_refused(stage, offload_params, cpu_offload, message):
    cfg = run_config()
    cfg.train.deepspeed.zero_stage = stage
    cfg.train.deepspeed.offload_params = offload_params
    cfg.train.memory.cpu_offload = cpu_offload
    with pytest.raises(ValueError, match=message):
        check_deepspeed(cfg)


def test_checkpoint_without_the_marker_is_refused_before_loading(tmp_path):
    from longtrain.distributed.deepspeed_zero import DeepSpeedRun

    # Load checks come first; the layout checks are in test_deepspeed_universal.py.
    run = DeepSpeedRun(engine=None, world_size=2, zero_stage=3)
    with pytest.raises(ValueError, match="is not a DeepSpeed checkpoint"):
        run.load(tmp_path)
