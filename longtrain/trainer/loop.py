"""The training loop: set up a run, then step, log, checkpoint until `train.steps`.

Reads as the run goes: the run directory, data, model (parallelised from outside by
`longtrain.distributed.parallelize`), optimizer; resume if asked (`start`); then one
`_one_step` per optimizer step (`run`). Everything here is the same on every rank; only rank
0 writes files (DCP shards excepted). SIGTERM or SIGUSR1 (`longtrain.trainer.preemption`) stops
the run at the next step boundary, with a checkpoint of the steps done.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kernels.attention import describe_backend_choice
from longtrain.config import RunConfig
from longtrain.config.rules import validate_run_config
from longtrain.distributed import DistEnv, barrier
from longtrain.distributed.deepspeed_zero import build_deepspeed
from longtrain.distributed.meta_start import build_parallel_model
from longtrain.distributed.parallelize import build_parallel_dims, describe_layout
from longtrain.distributed.precision import (
    check_bf16_device,
    compute_dtype,
    describe_precision,
)
from longtrain.errors import NonFiniteError, RunInterrupted
from longtrain.model import train_flops
from longtrain.model.llama import set_rope_theta
from longtrain.trainer.checkpoint import Checkpointer
from longtrain.trainer.diagnostics import StepMonitor
from longtrain.trainer.evaluate import Evaluator
from longtrain.trainer.inputs import open_token_store, open_val_store, rank_loader
from longtrain.trainer.metrics import MetricsLogger, device_peak_tflops, peak_memory_bytes
from longtrain.trainer.optimizer import build_optimizer, build_scheduler
from longtrain.trainer.preemption import PreemptionHandler
from longtrain.trainer.run_dir import agree_run_dir, check_run_dir, save_resolved_config
from longtrain.trainer.step import train_step
from parallel.adaptive_calibrate import calibrate, method_probes

StepCallback = Callable[[int, dict], None]


@dataclass
class Session:
    """Everything a started run holds; `start` builds it, `run` drives it."""

    cfg: RunConfig
    env: DistEnv
    run_dir: Path
    model: torch.nn.Module  # what the forward runs through (DeepSpeed's engine with ZeRO)
    optimizer: torch.optim.Optimizer
    scheduler: object
    step_ctx: object  # longtrain.distributed.context.StepContext
    loader: object  # longtrain.data.loader.PackedLoader
    ckpt: Checkpointer
    start_step: int
    preemption: PreemptionHandler  # installed by `start`, restored when `run` ends
    evaluator: Evaluator | None = None  # train.eval_every: the held-out documents


def _open_store(cfg: RunConfig, env: DistEnv):
    store = open_token_store(cfg.data, env)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = store.vocab_size
    elif cfg.model.vocab_size < store.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the token store's "
            f"vocabulary ({store.vocab_size}, tokenizer {store.header['tokenizer']}); use the "
            "model's tokenizer (data.tokenizer=DIR) or model.vocab_size=0"
        )
    return store


class StoppedBeforeStart(Exception):
    """SIGTERM or SIGUSR1 arrived before the run opened its data; `message` is its line."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.message, self.run_dir = message, run_dir


def start(cfg: RunConfig, run_dir: Path, env: DistEnv) -> Session:
    """Check the config, agree on the run directory, open the data, build and parallelise
    the model, and resume when asked. The order fixes what every RNG draw is used for.

    From here on SIGTERM and SIGUSR1 are recorded, not fatal: `run` acts on them before its
    first step (a signal during start-up) and at every step boundary. One already recorded
    (the command installs its handler first) raises StoppedBeforeStart before the data is
    opened."""
    preemption = PreemptionHandler().install()
    try:
        return _start(cfg, run_dir, env, preemption)
    except BaseException:
        preemption.restore()
        raise


def _start(cfg: RunConfig, run_dir: Path, env: DistEnv, preemption: PreemptionHandler) -> Session:
    validate_run_config(cfg, env.world_size)
    check_bf16_device(cfg.model.dtype, env.device)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = agree_run_dir(run_dir, env)
    check_run_dir(run_dir, cfg.train.resume, env)
    # A signal so far (imports, composition, the rendezvous): stop before the data is opened
    # (preparing it can take minutes) and the model built. Collective, as at every boundary.
    signalled = preemption.agreed(env)
    if signalled is not None:
        raise StoppedBeforeStart(
            f"{signalled.name} during start-up: stopped before opening the data; nothing was "
            f"trained or written; continue with train.resume=auto hydra.run.dir={run_dir}",
            run_dir,
        )
    store = _open_store(cfg, env)
    dims = build_parallel_dims(cfg, env)
    if env.is_main:
        save_resolved_config(cfg, run_dir)
        print(describe_layout(cfg, env, dims), flush=True)
        print(describe_precision(cfg.model.dtype, cfg.train.engine, env.world_size), flush=True)
        attn_dtype = compute_dtype(cfg.model.dtype)
        print(describe_backend_choice(cfg.model.attn_backend, env.device, attn_dtype), flush=True)

    # On the meta device, parallelised and sharded there, then only this rank's shards
    # materialised (longtrain.distributed.meta_start).
    model, step_ctx = build_parallel_model(cfg, env, dims, pad_id=store.pad_id)
    if step_ctx.sp_policy is not None and cfg.parallel.calibrate:
        _calibrate_placement(step_ctx.sp_policy, cfg, env, dims)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    if cfg.train.engine == "deepspeed":
        step_ctx.engine = build_deepspeed(model, optimizer, cfg, env.world_size)
        model = step_ctx.engine.engine  # the forward runs through DeepSpeed's hooks
    loader = rank_loader(store, cfg, dims)
    evaluator = None
    if cfg.train.eval_every:
        dp_rank, dp_size = (0, 1) if dims is None else (dims.dp_rank, dims.dp)
        val_store = open_val_store(cfg.data, store, env) if cfg.data.val_source else store
        evaluator = Evaluator(val_store, cfg, dp_rank, dp_size, step_ctx)

    ckpt = Checkpointer(
        run_dir,
        env,
        cfg.train.keep_last,
        engine=step_ctx.engine,
        checksums=cfg.train.ckpt_checksums,
        async_save=cfg.train.ckpt_async,
    )
    start_step = 0
    resume_from = ckpt.resolve(cfg.train.resume)
    if resume_from is not None:
        start_step = ckpt.load(resume_from, model, optimizer, scheduler, loader)
        if env.is_main:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    return Session(
        cfg, env, run_dir, model, optimizer, scheduler, step_ctx, loader, ckpt, start_step,
        preemption, evaluator,
    )  # fmt: skip


def _one_step(s: Session, step: int, batches, logger: MetricsLogger, monitor: StepMonitor):
    """Read, train, log and checkpoint optimizer step `step`; returns its metrics line. A step
    whose update was skipped (non-finite) saves no checkpoint."""
    monitor.mark("data")
    step_batches = next(batches)
    assert step_batches.step == step, "loader and loop disagree on the step"
    if step_batches.rope_theta is not None:
        set_rope_theta(s.model, step_batches.rope_theta)
    record = train_step(
        s.model, s.optimizer, s.scheduler, step_batches.micro_batches, s.step_ctx, monitor.mark
    )
    record = _finish_record(record, step, step_batches, s.cfg, s.env)
    if hasattr(s.model, "sp_comm_stats"):  # SP attention bytes sent and received
        record.update(s.model.sp_comm_stats.step_metrics())
    monitor.mark("metrics")
    logger.log(record)
    if record["skipped"] and not s.cfg.train.skip_nonfinite:
        return record  # `run` stops the run
    done = step + 1
    # Before the checkpoint: a resume from an earlier one redoes this evaluation too.
    if s.evaluator is not None and done % s.cfg.train.eval_every == 0:
        monitor.mark("evaluate")
        logger.log_eval(s.evaluator.evaluate(s.model, step))
    if _checkpoint_due(done, s.cfg):
        monitor.mark("checkpoint save")
        s.ckpt.save(done, s.model, s.optimizer, s.scheduler, s.loader)
    return record


def run(s: Session, step_callbacks: Sequence[StepCallback] = ()) -> Path:
    """Train from `s.start_step` to `train.steps`; returns the run directory.

    Each of `step_callbacks` is called as `callback(step, record)` on every rank once step
    `step` is done (logged, and checkpointed when due). After SIGTERM or SIGUSR1 on any rank
    the run stops at the next step boundary with a checkpoint of the steps done, and returns
    as a finished run does (exit status 0: see `_stop_if_signalled`)."""
    try:
        # A signal during start-up: stop before anything is written (the metrics logger
        # already rewrites metrics.jsonl on resume); every rank agrees, as at each boundary.
        signalled = s.preemption.agreed(s.env)
        if signalled is not None:
            s.loader.close()
            if s.env.is_main:
                print(_startup_message(signalled.name, s), file=sys.stderr, flush=True)
            return s.run_dir
        return _train(s, step_callbacks)
    finally:
        s.preemption.restore()


def _train(s: Session, step_callbacks: Sequence[StepCallback]) -> Path:
    cfg, env = s.cfg, s.env
    logger = MetricsLogger(
        s.run_dir,
        cfg.logging,
        env.is_main,
        cfg.train.steps,
        s.start_step,
        OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        cfg.experiment,
        log_every=cfg.train.log_every,
    )
    # Heartbeat, failure report naming rank/step/operation, optional hang exit; in a
    # distributed run a failing rank exits at once so that its peers do not wait.
    monitor = StepMonitor(
        env.rank,
        heartbeat_s=cfg.train.heartbeat_s,
        hang_timeout_s=cfg.train.hang_timeout_s,
        exit_on_failure=env.distributed,
    )
    s.model.train()
    batches = iter(s.loader)
    step, interrupted, preempted = s.start_step, False, False
    try:
        with monitor:
            for step in range(s.start_step, cfg.train.steps):
                with monitor.step(step):
                    record = _one_step(s, step, batches, logger, monitor)
                    stop = record["skipped"] and not cfg.train.skip_nonfinite
                    monitor.mark("step callbacks")
                    for callback in () if stop else step_callbacks:
                        callback(step, record)
                    preempted = not stop and _stop_if_signalled(s, step, monitor)
                # Decided from the global loss and norm, so every rank stops here together
                # (outside the monitor, which would report it as a crash of one rank).
                if stop:
                    s.ckpt.wait()  # the save in flight, from before the bad step, completes
                    raise NonFiniteError(_nonfinite_message(record, s.ckpt))
                if preempted:
                    break
            monitor.mark("checkpoint wait")
            s.ckpt.wait()  # train.ckpt_async: the last save becomes complete and visible
    except KeyboardInterrupt:
        interrupted = True
        raise RunInterrupted(_interrupt_message(step, s.ckpt, s.run_dir)) from None
    finally:
        s.loader.close()  # stop the prefetch thread, also when a step failed
        # A stopped run's plot helps too; not a preempted one's (the next start draws it, and
        # the time before the launcher's SIGKILL is better left to exiting).
        plot = logger.close(draw_plot=not (interrupted or preempted))
    barrier(env)
    if env.is_main:
        _print_outputs(s, plot)
    return s.run_dir


def _checkpoint_due(done: int, cfg: RunConfig) -> bool:
    """Whether the schedule saves a checkpoint once `done` steps are done (same on all ranks)."""
    t = cfg.train
    return bool(t.ckpt_every and done % t.ckpt_every == 0) or (t.ckpt_final and done == t.steps)


def _stop_if_signalled(s: Session, step: int, monitor: StepMonitor) -> bool:
    """At the boundary after step `step` (collective): whether some rank got SIGTERM or
    SIGUSR1; if so, save the steps done (unless the schedule just did) and say so on rank 0.

    The run then ends like a finished one, with exit status 0: under torchrun a nonzero
    status of a worker makes the agent restart the whole group (--max-restarts), which would
    train on where the launcher asked to stop. Who signalled knows why (the Slurm script
    requeues the job); the line printed here names the signal."""
    monitor.mark("preemption check")
    signalled = s.preemption.agreed(s.env)
    if signalled is None:
        return False
    done = step + 1
    if not _checkpoint_due(done, s.cfg):  # else `_one_step` has just saved this state
        monitor.mark("checkpoint save (preempted)")
        s.ckpt.save(done, s.model, s.optimizer, s.scheduler, s.loader)
    if s.env.is_main:
        print(
            f"{signalled.name}: stopped after step {step} ({done} of {s.cfg.train.steps} done), "
            f"saved as {s.ckpt.root}/step_{done:08d}; continue with train.resume=auto "
            f"hydra.run.dir={s.run_dir}",
            file=sys.stderr,
            flush=True,
        )
    return True


def _print_outputs(s: Session, plot: Path | None) -> None:
    print(f"run directory: {s.run_dir}")
    print(f"  metrics:     {s.run_dir / 'metrics.jsonl'}")
    if plot is not None:
        print(f"  plot:        {plot}")
    print(f"  checkpoints: {s.ckpt.root}", flush=True)


def _newest(ckpt: Checkpointer) -> str:
    return f"checkpoint {ckpt.root}/step_{max(ckpt.good):08d}" if ckpt.good else "no checkpoint"


def _nonfinite_message(record: dict, ckpt: Checkpointer) -> str:
    return (
        f"step {record['step']}: the loss is {record['loss']} and the gradient norm "
        f"{record['grad_norm']}; the update was not applied and the run stops (newest good: "
        f"{_newest(ckpt)}). Resume with a lower optim.lr or optim.grad_clip, or set "
        "train.skip_nonfinite=true to skip such steps"
    )


def _interrupt_message(step: int, ckpt: Checkpointer, run_dir: Path) -> str:
    if not ckpt.good:
        return f"interrupted during step {step}; no checkpoint was written yet"
    return (
        f"interrupted during step {step}; resume from {_newest(ckpt)} with "
        f"train.resume=auto hydra.run.dir={run_dir}"
    )


def _calibrate_placement(policy, cfg: RunConfig, env: DistEnv, dims) -> None:
    """Measure the adaptive placement's cost model on this run's device and SP group (or keep
    the configured one, saying why), every rank alike: parallel/adaptive_calibrate.py."""
    policy.model, line = calibrate(
        dims.sp_group, env.device, policy.shape, cfg.model.dim, cfg.model.ffn_dim, policy.model,
        cfg.parallel.calibrate_timeout_s, cfg.model.attn_backend,
        method_probes(policy.methods, dims), dims.sp_rank,
    )  # fmt: skip
    if env.is_main:
        print(line, flush=True)


def _startup_message(signal_name: str, s: Session) -> str:
    return (
        f"{signal_name} during start-up: stopped before step {s.start_step}; nothing was "
        f"trained, no metrics or checkpoint written (newest: {_newest(s.ckpt)}); continue "
        f"with train.resume=auto hydra.run.dir={s.run_dir}"
    )


def _finish_record(record: dict, step: int, step_batches, cfg: RunConfig, env: DistEnv) -> dict:
    flops = train_flops(cfg.model, record["tokens"], record.pop("attended_pairs"))
    peak = device_peak_tflops(env.device, cfg.train.peak_tflops) * 1e12 * env.world_size
    return {
        "step": step,
        **record,
        "seq_len": step_batches.seq_len,
        "stage": step_batches.stage,
        "cost_imbalance": step_batches.cost_imbalance,
        "mem_peak_bytes": peak_memory_bytes(env.device),
        "tflops": flops / record["step_time_s"] / 1e12,
        "mfu": flops / record["step_time_s"] / peak if peak > 0 else None,
        "time": time.time(),
    }


__all__ = ["Session", "StepCallback", "run", "start"]
