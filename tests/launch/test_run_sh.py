"""launch/run.sh: the torchrun command it builds from its settings, the mistakes it refuses,
the config check before torchrun, and a real two-process start on this machine (with a
stand-in for the trainer)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "launch" / "run.sh"
RUN_SH_SETTINGS = (  # run.sh's variables: the caller's environment must not leak into a test
    "NGPU", "NNODES", "RDZV_ENDPOINT", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RDZV_ID",
    "MAX_RESTARTS", "LOG_RANKS", "RUN_DIR", "PYTHON", "TRAIN_MODULE", "DRY_RUN", "SKIP_CHECK",
    "CUDA_VISIBLE_DEVICES", "SHUTDOWN_S",
)  # fmt: skip


def _run_sh(*overrides: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in RUN_SH_SETTINGS}
    env.update(settings)
    return subprocess.run(
        ["bash", str(RUN_SH), *overrides], env=env, capture_output=True, text=True, timeout=120
    )


def _dry_run(*overrides: str, **settings: str) -> list[str]:
    done = _run_sh(*overrides, DRY_RUN="1", **settings)
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def _torchrun_args(cmd: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, trainer arguments after `-m MODULE`)."""
    assert cmd[1:3] == ["-m", "torch.distributed.run"], cmd
    module = cmd.index("-m", 3)
    return cmd[3:module], cmd[module + 2 :]


def test_one_machine_with_restarts_and_rank_filter():
    # The config is checked for 3 processes (global batch a multiple of 3), reading no data.
    cmd = _dry_run("model=tiny", "data.source=dir:/my texts", "train.global_batch=6", NGPU="3",
                   MAX_RESTARTS="2", LOG_RANKS="0,2", RUN_DIR="runs/a b")  # fmt: skip
    venv_python = REPO / ".venv" / "bin" / "python"
    assert cmd[0] == (str(venv_python) if venv_python.exists() else "python3")
    options, trainer = _torchrun_args(cmd)
    assert options == [
        "--nnodes=1",
        "--nproc_per_node=3",
        "--standalone",
        "--max-restarts=2",
        "--log-dir=runs/a b/logs",
        "--tee=3",
        # USR1 reaches the workers (they save and exit), as TERM does.
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--local-ranks-filter=0,2",
    ]
    # Restarts resume; the user's overrides come last so that they win.
    assert trainer == ["hydra.run.dir=runs/a b", "train.resume=auto", "model=tiny",
                       "data.source=dir:/my texts", "train.global_batch=6"]  # fmt: skip


def test_defaults_pick_a_fresh_run_dir_and_do_not_resume():
    options, trainer = _torchrun_args(_dry_run(CUDA_VISIBLE_DEVICES="0,1,2,3"))
    assert "--nproc_per_node=4" in options  # the visible GPUs
    assert "--max-restarts=0" in options
    assert not any(o.startswith("--local-ranks-filter") for o in options)
    assert len(trainer) == 1 and trainer[0].startswith("hydra.run.dir=runs/20")


def test_multi_node_rendezvous():
    # The default global batch (8) cannot start on 32 or 16 ranks (see the check's own test
    # below); these commands are about the rendezvous only.
    c10d, _ = _torchrun_args(
        _dry_run(
            NNODES="4",
            NGPU="8",
            RDZV_ENDPOINT="node07:29400",
            RUN_DIR="/shared/run1",
            SKIP_CHECK="1",
        )  # fmt: skip
    )
    assert c10d[:5] == [
        "--nnodes=4",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node07:29400",
        "--rdzv_id=run1",
    ]
    static, _ = _torchrun_args(
        _dry_run(
            NNODES="2",
            NGPU="8",
            MASTER_ADDR="10.0.0.1",
            MASTER_PORT="29500",
            NODE_RANK="1",
            RUN_DIR="/shared/run1",
            SKIP_CHECK="1",
        )  # fmt: skip
    )
    assert static[2:5] == ["--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"]


@pytest.mark.parametrize(
    ("overrides", "settings", "message"),
    [
        (["hydra.run.dir=/x"], {}, "pass the run directory as RUN_DIR=/x"),
        (["-m"], {}, "sweeps are launched by Hydra"),
        ([], {"NNODES": "2", "RDZV_ENDPOINT": "h:1"}, "set RUN_DIR to one directory"),
        ([], {"NNODES": "2", "RUN_DIR": "r"}, "set RDZV_ENDPOINT=host:port"),
        ([], {"NNODES": "2", "RUN_DIR": "r", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "NODE_RANK"),
        ([], {"NGPU": "two"}, "NGPU=two is not a whole number"),
        ([], {"LOG_RANKS": "rank0"}, "LOG_RANKS=rank0"),
    ],
)
def test_mistakes_are_refused_with_the_fix(overrides, settings, message):
    done = _run_sh(*overrides, DRY_RUN="1", **settings)
    assert done.returncode == 2
    assert message in done.stderr


def test_a_config_error_stops_before_torchrun(tmp_path):
    """Without the check, torchrun starts 2 ranks that each fail, 3 times (MAX_RESTARTS=2)."""
    run_dir = tmp_path / "run"
    done = _run_sh("train.micro_batch=-1", NGPU="2", MAX_RESTARTS="2", RUN_DIR=str(run_dir))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "longtrain.check: error: train.micro_batch=-1 must be >= 0 (0: the whole batch in one "
        "forward)"
    ]
    assert done.stdout == "" and not run_dir.exists()  # torchrun never started


def test_dry_run_is_checked_for_every_node_unless_skipped():
    settings = dict(NNODES="4", NGPU="8", RDZV_ENDPOINT="node07:29400", RUN_DIR="/shared/run1")
    done = _run_sh(DRY_RUN="1", **settings)
    assert done.returncode == 2 and done.stdout == ""  # no command printed
    assert done.stderr.splitlines() == [
        "longtrain.check: error: train.global_batch (8) must be divisible by the "
        "data-parallel size (32); use a multiple of 32"
    ]
    ok = _run_sh("train.global_batch=64", DRY_RUN="1", **settings)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.startswith("config ok: 32 processes = dp=32 x ulysses=1 x ring=1")
    assert shlex.split(ok.stdout)[-1] == "train.global_batch=64"  # stdout: the command only
    skipped = _run_sh("trian.steps=5", DRY_RUN="1", SKIP_CHECK="1", **settings)
    assert skipped.returncode == 0 and skipped.stderr == ""
    assert shlex.split(skipped.stdout)[-1] == "trian.steps=5"


@pytest.mark.distributed
def test_starts_two_processes_that_share_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    done = _run_sh("a=1", "b=x y", NGPU="2", LOG_RANKS="1", RUN_DIR=str(run_dir),
                   TRAIN_MODULE="tests.launch.echo_rank", PYTHONPATH=str(REPO),
                   PYTHON=sys.executable)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["env"]["WORLD_SIZE"] for s in seen] == ["2", "2"]
    assert all(s["argv"] == [f"hydra.run.dir={run_dir}", "a=1", "b=x y"] for s in seen)
    assert all(s["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" for s in seen)
    # The console shows local rank 1 only; both ranks' output is in the run's logs.
    assert "rank 1 of 2" in done.stdout and "rank 0 of 2" not in done.stdout
    logs = sorted(p.read_text() for p in run_dir.glob("logs/*/attempt_0/*/stdout.log"))
    assert logs == ["echo_rank: rank 0 of 2\n", "echo_rank: rank 1 of 2\n"]


def test_shutdown_grace_is_passed_to_torchrun_and_checked():
    options, _ = _torchrun_args(_dry_run(NGPU="2", SHUTDOWN_S="120"))
    assert "--shutdown-timeout=120" in options
    done = _run_sh(DRY_RUN="1", NGPU="2", SHUTDOWN_S="soon")
    assert done.returncode == 2
    assert done.stderr.strip().endswith("SHUTDOWN_S=soon: whole seconds, at least 1")
