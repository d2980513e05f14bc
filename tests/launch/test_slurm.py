"""launch.slurm and launch/slurm.sbatch without a cluster: the rendered script is run by bash
with stand-ins for srun, scontrol and sbatch (small scripts on PATH that record what they were
asked), so the checks see the arguments after bash has expanded them. The stand-ins behave as
the real commands do where the script relies on it: srun passes USR1 on to its tasks, and
`scontrol requeue` ends the job's steps."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import SlurmJob, main, render_sbatch
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
JOB_ID = 73151  # the fake job's id; the derived port is 20000 + 73151 % 20000 = 33151

SCONTROL = r"""#!/bin/bash
# stand-in: `show hostnames` expands gpu[001-00N] (or prints FAKE_HOSTS); `requeue` is
# recorded and, like Slurm, ends the job's steps.
case "$1 $2" in
"show hostnames")
    if [[ -n "${FAKE_HOSTS:-}" ]]; then tr ',' '\n' <<<"$FAKE_HOSTS"; exit 0; fi
    n=${3//[^0-9-]/}; n=${n#*-}
    for ((i = 1; i <= 10#$n; i++)); do printf 'gpu%03d\n' "$i"; done ;;
"requeue "*)
    srun_pid=$(cat "$SHIM_DIR/srun.pid")
    if kill -0 "$srun_pid" 2>/dev/null; then
        echo "requeue $2 while srun runs" >>"$SHIM_DIR/scontrol.log"
        kill "$srun_pid"
    else
        echo "requeue $2 after srun" >>"$SHIM_DIR/scontrol.log"
    fi ;;
*) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""

SRUN = r"""#!/bin/bash
# stand-in: record the arguments; then, as SRUN_MODE says, exit, sleep (a long job step that
# stands for a trainer: on USR1 it "saves" and exits 0), or run the command once per node of
# the allocation, passing USR1 on to each. srun.pid is written once the traps are set.
printf '%s\0' "$@" >"$SHIM_DIR/srun.args"
case "${SRUN_MODE:-record}" in
record) echo $$ >"$SHIM_DIR/srun.pid"; exit 0 ;;
sleep)
    sleep 60 &
    child=$!
    trap 'echo USR1 >>"$SHIM_DIR/srun.signals"; kill "$child"; exit 0' USR1
    trap 'kill "$child"; exit 143' TERM
    echo $$ >"$SHIM_DIR/srun.pid"
    wait "$child" ;;
run)
    while [[ "$1" == --* ]]; do shift; done
    pids=()
    trap 'echo USR1 >>"$SHIM_DIR/srun.signals"; kill -USR1 "${pids[@]}"' USR1
    for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do SLURM_NODEID=$n "$@" & pids+=($!); done
    echo $$ >"$SHIM_DIR/srun.pid"
    rc=0
    for p in "${pids[@]}"; do
        # A trapped signal ends `wait` early: wait again until the task has ended.
        while wait "$p"; st=$?; kill -0 "$p" 2>/dev/null; do :; done
        [[ "$st" -eq 0 ]] || rc=$st
    done
    exit $rc ;;
esac
"""

PYTHON = r"""#!/bin/bash
# stand-in for the job's python, for `-m torch.distributed.run --help` only: a torchrun with
# or without the options that let it pass USR1 on to its workers.
echo "usage: torchrun [--max-restarts MAX_RESTARTS] ${FAKE_TORCHRUN_OPTIONS:-}"
"""

SBATCH = r"""#!/bin/bash
# stand-in: record the arguments and the script, answer like `sbatch --parsable`.
printf '%s\0' "$@" >"$SHIM_DIR/sbatch.args"
cp "${@: -1}" "$SHIM_DIR/submitted.sbatch"
echo "424242;cluster"
"""


@pytest.fixture
def shims(tmp_path, monkeypatch) -> Path:
    """A directory of stand-ins first on PATH; returns where they write their records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("scontrol", SCONTROL),
        ("srun", SRUN),
        ("sbatch", SBATCH),
        ("fake-python", PYTHON),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SHIM_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the job's working directory: run dirs land in tmp_path
    return tmp_path


def _dry_run(capsys, *args: str) -> tuple[str, list[str]]:
    """(script, submit command) printed by `python -m launch.slurm --dry-run *args`."""
    assert main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out
    checked = "--module" not in args and "--skip-check" not in args
    assert out.startswith("# config ok: ") == checked, out[:300]
    script = out.split("# ---- submit command ----\n")[0].split(" ----\n", 1)[1]
    command = shlex.split(out.split("# ---- submit command ----\n")[1])
    return script, command


def _run_batch(script: str, shim_dir: Path, nodes: int, **env: str) -> subprocess.Popen:
    path = shim_dir / "job.sbatch"
    path.write_text(script)
    job_env = {
        **os.environ,
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_CPUS_PER_TASK": "64",
        **env,
    }
    return subprocess.Popen(
        ["bash", str(path)],
        env=job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _recorded(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def test_dry_run_4x8_has_the_right_torchrun_arguments(shims, capsys):
    # demo_cpu's ulysses=0 would take all 32 ranks (more than the tiny model's 4 heads): the
    # config check refuses that (see test_config_errors_...), so the degree is set.
    overrides = [
        "experiment=demo_cpu",
        "parallel.ulysses=4",
        "data.source=dir:/my data",
        "optim.lr=3e-4",
    ]
    script, command = _dry_run(
        capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time",
        "2:00:00", "--max-restarts", "2", *overrides,
    )  # fmt: skip
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    slurm_dir = shims / "runs" / "slurm"
    assert command[:2] == ["sbatch", "--parsable"]
    assert Path(command[2]).parent == slurm_dir and command[2].endswith(".sbatch")
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=2:00:00",
        "--requeue",
        "--signal=B:USR1@120",
        f"--output={slurm_dir}/%x-%j.out",
    ):
        assert f"#SBATCH {expected}" in header, (expected, header)

    job = _run_batch(script, shims, nodes=4)
    log, _ = job.communicate(timeout=30)
    assert job.returncode == 0, log
    args = _recorded(shims / "srun.args")
    launcher = args.index(sys.executable)
    assert args[:launcher] == ["--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    module = args.index("-m", launcher + 3)
    run_dir = f"runs/longtrain-{JOB_ID}"
    assert args[launcher + 1 : launcher + 3] == ["-m", "torch.distributed.run"]
    assert args[launcher + 3 : module] == [
        "--nnodes=4",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=gpu001:{20000 + JOB_ID % 20000}",  # the first node of the job
        f"--rdzv_id={JOB_ID}",
        "--max-restarts=2",
        # torchrun passes USR1 on to its workers and gives them 90 s (120 less a margin) to save
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=90",
        f"--log-dir={run_dir}/logs",
        "--tee=3",
        "--local-ranks-filter=0",
    ]
    assert args[module:] == [
        "-m",
        "longtrain.train",
        f"hydra.run.dir={run_dir}",
        "train.resume=auto",
        *overrides,
    ]
    assert (shims / run_dir).is_dir()
    assert f"rendezvous gpu001:33151, run directory {run_dir}" in log


def test_explicit_run_dir_port_and_all_ranks(shims, capsys):
    script, _ = _dry_run(
        capsys, "--nodes", "2", "--gpus-per-node", "4", "--run-dir", "/scratch/my run",
        "--rdzv-port", "29400", "--log-ranks", "all", "--sbatch-arg", "exclusive",
    )  # fmt: skip
    assert "#SBATCH --exclusive" in script.splitlines()
    job = _run_batch(script.replace("/scratch/my run", str(shims / "my run")), shims, nodes=2)
    log, _ = job.communicate(timeout=30)
    assert job.returncode == 0, log
    args = _recorded(shims / "srun.args")
    assert "--rdzv_endpoint=gpu001:29400" in args
    assert f"hydra.run.dir={shims / 'my run'}" in args
    assert not any(a.startswith("--local-ranks-filter") for a in args)


def _wait_for(path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


FORWARDS = "[--signals-to-handle SIGNALS_TO_HANDLE] [--shutdown-timeout SHUTDOWN_TIMEOUT]"


@pytest.mark.parametrize(
    ("sig", "requeue_on_term", "options", "outcome"),
    [
        (signal.SIGUSR1, False, FORWARDS, "saved, then requeued"),
        (signal.SIGTERM, False, FORWARDS, "stopped"),  # scancel: the job must stay cancelled
        (signal.SIGTERM, True, FORWARDS, "saved, then requeued"),
        # A torchrun without --signals-to-handle would die of USR1 and its workers unsaved: the
        # signal is not passed on, the job is requeued at once (from the newest checkpoint).
        (signal.SIGUSR1, False, "", "requeued at once"),
    ],
    ids=["usr1", "term", "term-requeues", "usr1-old-torchrun"],
)
def test_signal_is_passed_to_the_trainer_and_the_job_requeued_after(
    shims, sig, requeue_on_term, options, outcome
):
    job = SlurmJob(nodes=2, gpus_per_node=1, requeue_on_term=requeue_on_term,
                   python=str(shims / "bin" / "fake-python"))  # fmt: skip
    proc = _run_batch(
        render_sbatch(job), shims, nodes=2, SRUN_MODE="sleep", FAKE_TORCHRUN_OPTIONS=options
    )
    _wait_for(shims / "srun.pid")
    proc.send_signal(sig)
    head = ""
    if outcome == "stopped":  # Slurm signals the job steps too; here only the batch shell got it
        # Once the shell has handled TERM (its line is out), srun gets it too.
        while "got SIGTERM" not in head:
            line = proc.stdout.readline()
            assert line, f"the job ended without handling SIGTERM: {head}"
            head += line
        os.kill(int((shims / "srun.pid").read_text()), signal.SIGTERM)
    log, _ = proc.communicate(timeout=30)
    log = head + log
    scontrol_log = shims / "scontrol.log"
    passed_on = shims / "srun.signals"
    name = sig.name[3:]
    if outcome == "saved, then requeued":
        # USR1 (never TERM, which srun turns into SIGKILL) reached srun's tasks; the stand-in
        # trainer saved and exited 0; only then was the job requeued.
        assert passed_on.read_text() == "USR1\n"
        assert f"got SIG{name}: passing USR1 to the trainer" in log
        assert "srun exited with status 0" in log
        assert scontrol_log.read_text() == f"requeue {JOB_ID} after srun\n"
        assert proc.returncode == 0
    elif outcome == "requeued at once":
        assert "this torchrun cannot pass USR1 on (no --signals-to-handle)" in log
        assert not passed_on.exists()
        assert scontrol_log.read_text() == f"requeue {JOB_ID} while srun runs\n"
        # Slurm ends the job step at the requeue (the stand-in: TERM to srun).
        assert f"srun exited with status {128 + signal.SIGTERM}" in log
    else:
        assert not scontrol_log.exists() and not passed_on.exists()
        assert "got SIGTERM: stopping (no requeue)" in log
        # The script waited for srun (killed by TERM) and passed its status on.
        assert f"srun exited with status {128 + signal.SIGTERM}" in log
        assert proc.returncode == 128 + signal.SIGTERM


@pytest.mark.slow  # ~45 s; the signal chain is covered by the shim tests above and the save
@pytest.mark.distributed  # by tests/test_train_preemption.py; this joins them end to end
def test_usr1_reaches_the_trainer_which_saves_before_the_job_is_requeued(shims, corpus):
    """The whole chain with the real trainer: USR1 to the batch shell -> srun (stand-in) ->
    torchrun -> both workers, which finish their step, save and exit; then the requeue."""
    from longtrain.trainer.checkpoint import check_checkpoint, complete_checkpoints
    from tests.test_train import SMALL, data_overrides

    overrides = [*SMALL, *data_overrides(corpus, shims / "store"), "train.steps=100000",
                 "logging.plot=false"]  # fmt: skip
    job = SlurmJob(nodes=1, gpus_per_node=2, rdzv_port=free_port(), overrides=overrides)
    proc = _run_batch(
        render_sbatch(job), shims, nodes=1, SRUN_MODE="run", FAKE_HOSTS="127.0.0.1",
        PYTHONPATH=str(REPO),
    )  # fmt: skip
    run_dir = shims / "runs" / f"longtrain-{JOB_ID}"
    try:
        # Wait (by events, not by a clock budget) until two steps are logged: the signal then
        # comes mid-run, at no particular point of a step.
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run logged no two steps"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert "got SIGUSR1: passing USR1 to the trainer" in log, log[-3000:]
    assert (shims / "srun.signals").read_text() == "USR1\n"
    (line,) = [x for x in log.splitlines() if "SIGUSR1: stopped after step" in x]
    steps = len(metrics.read_text().splitlines())
    assert f"stopped after step {steps - 1} ({steps} of 100000 done)" in line
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert newest.name == f"step_{steps:08d}"
    check_checkpoint(newest)
    assert "forcefully exiting" not in log  # torchrun did not have to kill a worker
    assert (shims / "scontrol.log").read_text() == f"requeue {JOB_ID} after srun\n"


def test_submit_writes_the_script_and_calls_sbatch(shims, capsys):
    assert main(["--nodes", "1", "--gpus-per-node", "2", "--job-name", "abl", "train.steps=9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config ok: 2 processes = dp=2 x ulysses=1 x ring=1")
    assert "submitted job 424242" in out
    assert f"{shims}/runs/slurm/abl-424242.out" in out
    args = _recorded(shims / "sbatch.args")
    assert args[0] == "--parsable" and Path(args[1]).is_file()
    assert Path(args[1]).read_text() == (shims / "submitted.sbatch").read_text()
    assert "train.resume=auto train.steps=9 &" in Path(args[1]).read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hydra.run.dir=/x"], "use --run-dir"),
        (["train.resume=none"], "every start resumes"),
        (["--nodes", "0"], "--nodes 0"),
        (["--log-ranks", "first"], "--log-ranks 'first'"),
    ],
)
def test_bad_requests_are_refused_with_the_fix(capsys, args, message):
    base = ["--dry-run", "--nodes", "1", "--gpus-per-node", "1"]
    assert main([*base, *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "1", "--gpus-per-node", "2", "train.stepz=10"],
         "launch.slurm: Could not override 'train.stepz': Key 'stepz' not in 'TrainConfig'"),
        (["--nodes", "1", "--gpus-per-node", "2", "+train.foo=1"],
         "launch.slurm: unknown config key(s) train.foo"),
        # The whole job's world size (4 x 8): Ulysses over all 32 ranks, but 4 heads.
        (["--nodes", "4", "--gpus-per-node", "8", "experiment=demo_cpu"],
         "launch.slurm: ulysses=32 needs query heads (4) divisible by 32"),
        (["--nodes", "3", "--gpus-per-node", "1"],
         "launch.slurm: train.global_batch (8) must be divisible by the data-parallel size (3)"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line_and_nothing_is_written(shims, capsys, args, message, dry_run):
    assert main(["--dry-run", *args] if dry_run else args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(message), err
    assert not (shims / "runs").exists() and not (shims / "sbatch.args").exists()


def test_skip_check_and_other_modules_are_not_checked(shims, capsys):
    _dry_run(capsys, "--nodes", "1", "--gpus-per-node", "1", "--skip-check", "train.stepz=10")
    script, _ = _dry_run(
        capsys, "--nodes", "1", "--gpus-per-node", "1", "--module", "tests.launch.echo_rank", "a=1"
    )
    assert "-m tests.launch.echo_rank" in script and "a=1" in script


def test_no_sbatch_on_path_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


@pytest.mark.distributed
def test_two_nodes_meet_at_the_rendezvous(shims):
    """The rendered script, with srun starting one torchrun per 'node' on this machine: the
    agents meet at the c10d rendezvous and every rank gets the run directory and resume."""
    job = SlurmJob(
        nodes=2,
        gpus_per_node=1,
        module="tests.launch.echo_rank",
        rdzv_port=free_port(),
        log_ranks="all",
        overrides=["train.steps=3"],
    )
    proc = _run_batch(
        render_sbatch(job), shims, nodes=2, SRUN_MODE="run", FAKE_HOSTS="127.0.0.1,127.0.0.1",
        PYTHONPATH=str(REPO),
    )  # fmt: skip
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log
    run_dir = shims / "runs" / f"longtrain-{JOB_ID}"
    seen = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["env"]["WORLD_SIZE"] for s in seen] == ["2", "2"]
    assert [s["env"]["LOCAL_RANK"] for s in seen] == ["0", "0"]  # one process per node
    assert all(s["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" for s in seen)
    for s in seen:
        assert s["argv"] == [
            f"hydra.run.dir=runs/longtrain-{JOB_ID}",
            "train.resume=auto",
            "train.steps=3",
        ]
