"""Preemption: SIGUSR1 or SIGTERM makes every rank finish its step, save, and exit (2 gloo
processes under torchrun, float64); the continued run's losses equal an uninterrupted run's.

The signal is sent from inside a step (a step callback of rank 1, which runs before the
step's boundary) so that the test knows which boundary must see it: this module is also the
entry point torchrun runs (`python -m tests.test_train_preemption --send-step K ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longtrain.trainer.checkpoint import check_checkpoint, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "model.dtype=float64",
    "data.seq_len=64",
    "train.global_batch=4",
    f"train.steps={STEPS}",
    "train.ckpt_every=4",
    "train.keep_last=0",
    "optim.warmup_steps=2",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
    "logging.plot=false",
]
# What launch/slurm.sbatch passes: the agent forwards USR1 (not only TERM) to its workers and
# gives them time to save before it kills them.
AGENT_FLAGS = [
    "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    "--shutdown-timeout=120",
]


def _signal_in_step(step: int, sig: signal.Signals, to_agent: bool):
    def callback(done_step: int, record: dict) -> None:
        if done_step != step:
            return
        os.kill(os.getppid() if to_agent else os.getpid(), sig)
        # Step `step` lasts until this returns: wait until this rank's handler has the signal
        # (the agent forwards it to every worker), so that the boundary after this step is the
        # one that must see it. The handler is the trainer's PreemptionHandler._record.
        handler = signal.getsignal(sig).__self__
        deadline = time.monotonic() + 120
        while handler.received is None:
            assert time.monotonic() < deadline, "the signal never reached this rank"
            time.sleep(0.01)

    return callback


def _worker(argv: list[str]) -> None:
    """torchrun's entry point: train, and on rank --send-rank send signal --send (to itself,
    or to the torchrun agent with --to-agent) during step --send-step of the first attempt.
    (Not --signal...: torchrun's parser would take it for an abbreviation of its own
    --signals-to-handle.)"""
    from longtrain.train import load_config, train

    p = argparse.ArgumentParser()
    p.add_argument("--send", choices=["SIGUSR1", "SIGTERM"], default="SIGUSR1")
    p.add_argument("--send-rank", type=int, default=1)
    p.add_argument("--send-step", type=int, default=-1, help="-1: no signal")
    p.add_argument("--to-agent", action="store_true")
    args, rest = p.parse_known_args(argv)
    run_dir = Path([a.split("=", 1)[1] for a in rest if a.startswith("hydra.run.dir=")][-1])
    overrides = [a for a in rest if not a.startswith("hydra.run.dir=")]
    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "attempts.txt", "a") as f:
            f.write(f"attempt {attempt}\n")
    callbacks = []
    if rank == args.send_rank and attempt == 0 and args.send_step >= 0:
        sig = signal.Signals[args.send]
        callbacks.append(_signal_in_step(args.send_step, sig, args.to_agent))
    train(load_config(overrides), run_dir, step_callbacks=callbacks)


def _torchrun(run_dir: Path, common: list[str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", *AGENT_FLAGS, "-m", "tests.test_train_preemption", *extra,
           *common, f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _stopped(proc: subprocess.CompletedProcess, run_dir: Path, name: str, step: int) -> Path:
    """Check that the run stopped at the boundary after `step` for signal `name` with a
    complete checkpoint there, by itself; returns that checkpoint."""
    # The workers exited by themselves, after saving: torchrun did not have to kill them and
    # did not restart the group (--max-restarts=1; the workers' exit status is 0).
    assert "forcefully exiting" not in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / "attempts.txt").read_text().splitlines()[-1] == "attempt 0"
    done = step + 1
    (line,) = [x for x in proc.stderr.splitlines() if f"{name}: stopped after step" in x]
    assert f"{name}: stopped after step {step} ({done} of {STEPS} done)" in line, line
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert newest.name == f"step_{done:08d}" and f"saved as {newest};" in line
    check_checkpoint(newest)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    # At most the step in flight is lost: here none, it was finished and saved.
    assert [s for s, _ in _losses(run_dir)] == list(range(done))
    return newest


@pytest.mark.distributed
def test_signals_mid_step_save_at_the_next_boundary_and_the_run_resumes_exactly(tmp_path):
    from tests.fixtures import write_text_corpus

    corpus = write_text_corpus(tmp_path / "corpus", num_docs=60)
    common = [*TINY, f"data.source=dir:{corpus}", f"data.store_dir={tmp_path / 'store'}"]
    clean = _torchrun(tmp_path / "clean", common)
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = _losses(tmp_path / "clean")
    assert [s for s, _ in expected] == list(range(STEPS))

    # The Slurm path: USR1 to torchrun, which forwards it to every worker, during step 2.
    # Step 3 is off the checkpoint schedule (every 4): the signal makes the save. (torchrun
    # itself then exits 1: its agent re-raises the signal as an exception, by design.)
    run_dir = tmp_path / "preempted"
    first = _torchrun(run_dir, common, "--send=SIGUSR1", "--send-step=2", "--to-agent")
    _stopped(first, run_dir, "SIGUSR1", 2)

    # The continued run is stopped too: SIGTERM to rank 1 only (a `kill` of one worker), whose
    # peer learns of it at the boundary. After step 3 the schedule has saved already.
    second = _torchrun(run_dir, [*common, "train.resume=auto"], "--send=SIGTERM", "--send-step=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} at step 3" in second.stdout
    newest = _stopped(second, run_dir, "SIGTERM", 3)

    last = _torchrun(run_dir, [*common, "train.resume=auto"])
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"resumed from {newest} at step 4" in last.stdout
    # Same layout, same arithmetic after an exact restore: equal to the last bit.
    assert _losses(run_dir) == expected


def test_a_signal_during_start_up_stops_before_anything_is_written(tmp_path, corpus, capfd):
    from longtrain.distributed import init_distributed, shutdown
    from longtrain.train import load_config, train
    from longtrain.trainer import loop
    from tests.test_train import SMALL, data_overrides

    run_dir = tmp_path / "run"
    base = [*SMALL, *data_overrides(corpus, tmp_path / "store"), "logging.plot=false"]
    train(load_config([*base, "train.steps=2", "train.ckpt_every=1", "train.keep_last=0"]), run_dir)
    before = _files(run_dir)
    handler_before = signal.getsignal(signal.SIGUSR1)
    capfd.readouterr()

    cfg = load_config([*base, "train.steps=4", "train.resume=auto"])
    env = init_distributed(cfg.train.dist_timeout_s)
    try:
        session = loop.start(cfg, run_dir, env)
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not fatal: start installed the handler
        assert loop.run(session) == run_dir
    finally:
        shutdown(env)
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # restored
    err = capfd.readouterr().err
    (line,) = [x for x in err.splitlines() if "SIGUSR1" in x]
    assert line.startswith("SIGUSR1 during start-up: stopped before step 2; nothing was trained")
    assert f"newest: checkpoint {run_dir / 'checkpoints'}/step_00000002" in line
    assert "Traceback" not in err
    assert _files(run_dir) == before


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_a_signal_while_the_command_imports_stops_before_the_data_is_opened(tmp_path, corpus):
    from tests.test_train import SMALL, data_overrides

    store, run_dir = tmp_path / "store", tmp_path / "run"
    cmd = [sys.executable, "-m", "longtrain.train", *SMALL, *data_overrides(corpus, store)]
    cmd += ["train.steps=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Sent as soon as the command can record it (its first statement installs the
        # handler; torch, Hydra and the rest are imported after): the run must not die of
        # it, nor open (prepare) the data or build the model. The deadline only keeps a
        # broken start from hanging the suite.
        deadline = time.monotonic() + 120
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        # Before torch is loaded (its import takes a second or more): what this test is
        # about, and what a handler installed only by `loop.start` could not catch.
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if "SIGTERM" in x]
    assert line.startswith("SIGTERM during start-up: stopped before opening the data; nothing")
    assert f"train.resume=auto hydra.run.dir={run_dir}" in line
    assert not store.exists()  # the token store was never prepared
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def _files(run_dir: Path) -> dict[Path, bytes]:
    """metrics.jsonl and every checkpoint file, with their bytes."""
    paths = [run_dir / "metrics.jsonl", *(run_dir / "checkpoints").rglob("*")]
    return {p: p.read_bytes() for p in paths if p.is_file()}


if __name__ == "__main__":
    _worker(sys.argv[1:])
