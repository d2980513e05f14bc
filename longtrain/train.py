"""`python -m longtrain.train [overrides]`, alone or under torchrun: the training entry point.

Reads as the run goes: set up processes and the run directory, data, model (parallelised from
outside), optimizer; resume if asked; then the loop: step, log, checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from longtrain.checkpoint import Checkpointer
from longtrain.config import RunConfig, register_configs, to_run_config
from longtrain.data.setup import build_loader, open_token_store
from longtrain.diagnostics import StepMonitor
from longtrain.distributed import barrier, init_distributed, shutdown
from longtrain.engines.deepspeed_engine import build_deepspeed
from longtrain.errors import NonFiniteError, RunInterrupted, report_errors
from longtrain.metrics import MetricsLogger, device_peak_tflops, peak_memory_bytes
from longtrain.model import build_model, train_flops
from longtrain.model.llama import set_rope_theta
from longtrain.optim import build_optimizer, build_scheduler
from longtrain.parallelize import build_parallel_dims, describe_layout, parallelize
from longtrain.run_dir import agree_run_dir, check_run_dir, save_resolved_config
from longtrain.step import train_step
from longtrain.validate import validate_run_config

register_configs()
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(overrides: list[str] | None = None) -> RunConfig:
    """The typed config that `python -m longtrain.train *overrides` would run with."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        dcfg = compose("config", overrides=list(overrides or []))
    return to_run_config(dcfg)


StepCallback = Callable[[int, dict], None]


def train(cfg: RunConfig, run_dir: Path, step_callbacks: Sequence[StepCallback] = ()) -> Path:
    """Train as `cfg` says, writing into `run_dir`; returns the run directory used.

    Each of `step_callbacks` is called as `callback(step, record)` on every rank once step
    `step` is done (logged, and checkpointed when due); `record` is its metrics.jsonl line."""
    env = init_distributed(cfg.train.dist_timeout_s)
    try:
        return _train(cfg, run_dir, env, step_callbacks)
    finally:
        shutdown(env)


def _train(cfg: RunConfig, run_dir: Path, env, step_callbacks: Sequence[StepCallback]) -> Path:
    validate_run_config(cfg, env.world_size)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = agree_run_dir(run_dir, env)
    check_run_dir(run_dir, cfg.train.resume, env)
    store = open_token_store(cfg.data, env)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = store.vocab_size
    elif cfg.model.vocab_size < store.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the token store's "
            f"vocabulary ({store.vocab_size}, tokenizer {store.header['tokenizer']}); use the "
            "model's tokenizer (data.tokenizer=DIR) or model.vocab_size=0"
        )
    dims = build_parallel_dims(cfg, env)
    if env.is_main:
        save_resolved_config(cfg, run_dir)
        print(describe_layout(cfg, env, dims), flush=True)

    model = build_model(cfg.model, seed=cfg.train.seed, device=env.device)
    model, step_ctx = parallelize(model, dims, cfg, env, pad_id=store.pad_id)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    if cfg.train.engine == "deepspeed":
        step_ctx.engine = build_deepspeed(model, optimizer, cfg, env.world_size)
        model = step_ctx.engine.engine  # the forward runs through DeepSpeed's hooks
    loader = build_loader(store, cfg, dims, env)

    ckpt = Checkpointer(
        run_dir,
        env,
        cfg.train.keep_last,
        engine=step_ctx.engine,
        checksums=cfg.train.ckpt_checksums,
    )
    start_step = 0
    resume_from = ckpt.resolve(cfg.train.resume)
    if resume_from is not None:
        start_step = ckpt.load(resume_from, model, optimizer, scheduler, loader)
        if env.is_main:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)

    logger = MetricsLogger(
        run_dir,
        cfg.logging,
        env.is_main,
        cfg.train.steps,
        start_step,
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

    def one_step(step: int) -> dict:
        """Read, train, log, checkpoint and call back for optimizer step `step`; returns its
        metrics line. A step whose update was skipped (non-finite) saves no checkpoint."""
        monitor.mark("data")
        step_batches = next(batches)
        assert step_batches.step == step, "loader and loop disagree on the step"
        if step_batches.rope_theta is not None:
            set_rope_theta(model, step_batches.rope_theta)
        micro_batches = step_batches.micro_batches
        record = train_step(model, optimizer, scheduler, micro_batches, step_ctx, mark=monitor.mark)
        record = _finish_record(record, step, step_batches, cfg, env)
        if hasattr(model, "sp_comm_stats"):  # SP attention bytes sent and received
            record.update(model.sp_comm_stats.step_metrics())
        monitor.mark("metrics")
        logger.log(record)
        if record["skipped"] and not cfg.train.skip_nonfinite:
            return record  # the loop stops the run
        done = step + 1
        if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or (
            cfg.train.ckpt_final and done == cfg.train.steps
        ):
            monitor.mark("checkpoint save")
            ckpt.save(done, model, optimizer, scheduler, loader)
        monitor.mark("step callbacks")
        for callback in step_callbacks:
            callback(step, record)
        return record

    model.train()
    batches = iter(loader)
    step, interrupted = start_step, False
    try:
        with monitor:
            for step in range(start_step, cfg.train.steps):
                with monitor.step(step):
                    record = one_step(step)
                # Decided from the global loss and norm, so every rank stops here together
                # (outside the monitor, which would report it as a crash of one rank).
                if record["skipped"] and not cfg.train.skip_nonfinite:
                    raise NonFiniteError(_nonfinite_message(record, ckpt))
    except KeyboardInterrupt:
        interrupted = True
        raise RunInterrupted(_interrupt_message(step, ckpt, run_dir)) from None
    finally:
        loader.close()  # stop the prefetch thread, also when a step failed
        plot = logger.close(draw_plot=not interrupted)  # a stopped run's plot helps too
    barrier(env)
    if env.is_main:
        print(f"run directory: {run_dir}")
        print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
        if plot is not None:
            print(f"  plot:        {plot}")
        print(f"  checkpoints: {ckpt.root}", flush=True)
    return run_dir


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


def _finish_record(record: dict, step: int, step_batches, cfg: RunConfig, env) -> dict:
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


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    # A bad value, path or checkpoint, a non-finite loss and Ctrl-C end in one line.
    report_errors(
        "longtrain.train",
        lambda: train(to_run_config(dcfg), Path(HydraConfig.get().runtime.output_dir)),
    )


if __name__ == "__main__":
    main()
