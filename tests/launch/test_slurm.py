"""launch.slurm and launch/slurm.sbatch without a cluster: the rendered script is run by bash
with stand-ins for srun, scontrol and sbatch (small scripts on PATH that record what they were
asked), so the checks see the arguments after bash has expanded them."""

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
    echo "requeue $2" >>"$SHIM_DIR/scontrol.log"
    kill "$(cat "$SHIM_DIR/srun.pid")" ;;
*) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""

SRUN = r"""#!/bin/bash
# stand-in: record the arguments; then, as SRUN_MODE says, exit, sleep (a long job step), or
# run the command once per node of the allocation.
printf '%s\0' "$@" >"$SHIM_DIR/srun.args"
echo $$ >"$SHIM_DIR/srun.pid"
case "${SRUN_MODE:-record}" in
record) exit 0 ;;
sleep) exec sleep 60 ;;
run)
    while [[ "$1" == --* ]]; do shift; done
    pids=()
    for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do SLURM_NODEID=$n "$@" & pids+=($!); done
    rc=0
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    exit $rc ;;
esac
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
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("sbatch", SBATCH)):
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


@pytest.mark.parametrize(
    ("sig", "requeue_on_term", "requeued"),
    [
        (signal.SIGUSR1, False, True),
        (signal.SIGTERM, False, False),  # scancel: the job must stay cancelled
        (signal.SIGTERM, True, True),
    ],
)
def test_signal_requeues_the_job(shims, sig, requeue_on_term, requeued):
    script = render_sbatch(SlurmJob(nodes=2, gpus_per_node=1, requeue_on_term=requeue_on_term))
    job = _run_batch(script, shims, nodes=2, SRUN_MODE="sleep")
    _wait_for(shims / "srun.pid")
    job.send_signal(sig)
    head = ""
    if not requeued:  # Slurm signals the job steps too; here only the batch shell got it
        # Once the shell has handled TERM (its line is out), srun gets it too.
        while "got SIGTERM" not in head:
            line = job.stdout.readline()
            assert line, f"the job ended without handling SIGTERM: {head}"
            head += line
        os.kill(int((shims / "srun.pid").read_text()), signal.SIGTERM)
    log, _ = job.communicate(timeout=30)
    log = head + log
    scontrol_log = shims / "scontrol.log"
    if requeued:
        assert scontrol_log.read_text() == f"requeue {JOB_ID}\n"
        assert f"got SIG{sig.name[3:]}: requeueing" in log
    else:
        assert not scontrol_log.exists()
        assert "got SIGTERM: stopping (no requeue)" in log
    # The script waited for srun (killed by TERM) and passed its status on.
    assert f"srun exited with status {128 + signal.SIGTERM}" in log
    assert job.returncode == 128 + signal.SIGTERM


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
