"""Submit a longtrain run to Slurm from the template `launch/slurm.sbatch`.

    python -m launch.slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        experiment=demo_cpu train.steps=1000
    python -m launch.slurm --dry-run --nodes 4 --gpus-per-node 8 [overrides...]

The script is rendered here (every field filled, overrides shell-quoted), written next to the
Slurm logs and submitted with `sbatch --parsable`; `--dry-run` prints the script and the exact
command instead, so a launch can be checked on a machine without Slurm.

Before anything is rendered, the trainer's config is composed from the overrides and checked for
nodes x gpus-per-node processes (`python -m longtrain.check`, no data or GPU needed): a
misspelled key or an impossible grid is one line and exit 2 here, not a job that queues and
fails. `--skip-check` turns that off; a `--module` other than longtrain.train is not checked.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

TEMPLATE = Path(__file__).resolve().parent / "slurm.sbatch"
_FIELD = re.compile(r"\{\{([A-Z_]+)\}\}")
# Every start of the job resumes, and the run directory is fixed per job: neither may be
# overridden from the command line (pass --run-dir for the latter).
_RESERVED = ("hydra.run.dir=", "train.resume=")


@dataclass
class SlurmJob:
    """What one submission asks for; `render_sbatch` turns it into a batch script."""

    nodes: int
    gpus_per_node: int  # also the processes (ranks) per node
    overrides: list[str] = field(default_factory=list)  # Hydra overrides for the trainer
    job_name: str = "longtrain"
    partition: str = ""  # empty: the cluster's default
    time: str = ""  # time limit (Slurm format, e.g. 24:00:00); empty: the partition's default
    account: str = ""
    qos: str = ""
    cpus_per_task: int = 0  # CPUs for each node's torchrun; 0: Slurm's default
    sbatch_args: list[str] = field(default_factory=list)  # extra `#SBATCH --KEY[=VALUE]` lines
    run_dir: str = ""  # empty: <runs_root>/<job_name>-<job id>, stable across requeues
    runs_root: str = "runs"
    workdir: str = "."  # where the job starts (relative paths in overrides resolve here)
    max_restarts: int = 1  # torchrun restarts of the worker group within one allocation
    signal_s: int = 120  # USR1 this long before the time limit: save, then requeue
    requeue_on_term: bool = False  # also requeue on SIGTERM (clusters that preempt with TERM)
    rdzv_port: int = 0  # 0: derived from the job id (20000 + id % 20000)
    log_ranks: str = "0"  # local ranks on the console ("all": every rank); all go to logs/
    python: str = sys.executable
    module: str = "longtrain.train"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes {self.nodes}: need at least one node")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node}: need at least one per node")
        if self.signal_s < 1:
            raise ValueError(f"--signal-s {self.signal_s}: must be 1 or more")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts {self.max_restarts}: must be 0 or more")
        if not 0 <= self.rdzv_port < 65536:
            raise ValueError(f"--rdzv-port {self.rdzv_port}: not a port (0 derives one)")
        if self.log_ranks != "all" and not re.fullmatch(r"\d+(,\d+)*", self.log_ranks):
            raise ValueError(f"--log-ranks {self.log_ranks!r}: expected 'all' or e.g. '0' or '0,3'")
        for o in self.overrides:
            if o.startswith(_RESERVED):
                fix = "--run-dir" if o.startswith("hydra.") else "nothing: every start resumes"
                raise ValueError(f"override {o!r} is set by the Slurm script; use {fix}")
            if o.startswith("-"):
                raise ValueError(f"{o!r} is not a Hydra override (key=value)")
        if re.search(r"\s", self.log_dir):
            raise ValueError(f"the Slurm log directory {self.log_dir!r} must not contain spaces")

    @property
    def shutdown_s(self) -> int:
        """Seconds torchrun gives its workers to save after USR1 before it kills them: the
        warning time less a margin for torchrun, srun and the requeue to end in time."""
        return self.signal_s - min(30, self.signal_s // 4)

    @property
    def log_dir(self) -> str:
        """Absolute directory of Slurm's output files and the rendered scripts."""
        return str((Path(self.workdir) / self.runs_root / "slurm").resolve())


def _sbatch_lines(job: SlurmJob) -> list[str]:
    lines = []
    for key, value in (
        ("partition", job.partition),
        ("time", job.time),
        ("account", job.account),
        ("qos", job.qos),
        ("cpus-per-task", job.cpus_per_task or ""),
    ):
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    for arg in job.sbatch_args:
        lines.append(f"#SBATCH --{arg.removeprefix('--')}")
    return lines


def _run_dir_expr(job: SlurmJob) -> str:
    if job.run_dir:
        return shlex.quote(job.run_dir)
    return shlex.quote(f"{job.runs_root}/{job.job_name}") + '-"$SLURM_JOB_ID"'


def render_sbatch(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The batch script for `job`: the template with every {{FIELD}} filled."""
    values = {
        "JOB_NAME": job.job_name,
        "NODES": str(job.nodes),
        "GPUS_PER_NODE": str(job.gpus_per_node),
        "LOG_DIR": job.log_dir,
        "SIGNAL_S": str(job.signal_s),
        "SHUTDOWN_S": str(job.shutdown_s),
        "EXTRA_SBATCH": "\n".join(_sbatch_lines(job)),
        "WORKDIR": shlex.quote(str(Path(job.workdir).resolve())),
        "RUN_DIR": _run_dir_expr(job),
        "MAX_RESTARTS": str(job.max_restarts),
        "REQUEUE_ON_TERM": "1" if job.requeue_on_term else "0",
        "RDZV_PORT": str(job.rdzv_port) if job.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))",
        "PYTHON": shlex.quote(job.python),
        "LOG_RANKS_ARG": "" if job.log_ranks == "all" else f"--local-ranks-filter={job.log_ranks}",
        "TRAIN_MODULE": shlex.quote(job.module),
        "OVERRIDES": " ".join(shlex.quote(o) for o in job.overrides),
    }
    text = template.read_text()
    unknown = sorted(set(_FIELD.findall(text)) - set(values))
    if unknown:
        raise ValueError(f"template {template} has fields this renderer does not fill: {unknown}")
    return _FIELD.sub(lambda m: values[m.group(1)], text)


def script_path(job: SlurmJob, stamp: str) -> Path:
    """Where the rendered script of a submission made at `stamp` is written."""
    return Path(job.log_dir) / f"{job.job_name}-{stamp}.sbatch"


def sbatch_command(path: Path) -> list[str]:
    """The exact submission command for the script at `path`."""
    return ["sbatch", "--parsable", str(path)]


def check_job(job: SlurmJob) -> str | None:
    """Check the trainer's config of `job` for its nodes x gpus_per_node processes, as
    `python -m longtrain.check` does; returns its `config ok: ...` line, or None when `job`
    runs another module. Raises ValueError (one line) for a config that cannot start."""
    if job.module != "longtrain.train":
        return None
    # Imported here: composing the config needs torch and Hydra, rendering does not.
    try:
        from longtrain.check import check_config
    except ImportError as err:
        raise RuntimeError(
            f"cannot check the trainer's config here ({err}): run launch.slurm with the "
            "training environment's python, or add --skip-check"
        ) from err

    return check_config(job.overrides, job.nodes * job.gpus_per_node)


def submit(
    job: SlurmJob, dry_run: bool, out: TextIO | None = None, check: bool = True
) -> str | None:
    """Check the trainer's config (`check`, see `check_job`), then render `job`; print it and the
    command (`dry_run`), or write and submit it; messages go to `out` (default stdout). Returns
    the Slurm job id, or None for a dry run. A failed check raises before anything is written."""
    out = out or sys.stdout
    ok = check_job(job) if check else None
    if ok:
        print(f"# {ok}" if dry_run else ok, file=out)
    script = render_sbatch(job)
    path = script_path(job, time.strftime("%Y%m%d-%H%M%S"))
    command = sbatch_command(path)
    if dry_run:
        print(f"# ---- batch script (written to {path} when submitted) ----", file=out)
        print(script, end="", file=out)
        print("# ---- submit command ----", file=out)
        print(shlex.join(command), file=out)
        return None
    if shutil.which("sbatch") is None:
        raise RuntimeError(
            "sbatch is not on PATH: submit from a Slurm login node, or add --dry-run to print "
            "the script and command"
        )
    path.parent.mkdir(parents=True, exist_ok=True)  # Slurm does not create --output's directory
    path.write_text(script)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: script {path}", file=out)
    print(f"  Slurm log: {job.log_dir}/{job.job_name}-{job_id}.out", file=out)
    return job_id


def parse_args(argv: list[str] | None = None) -> tuple[SlurmJob, bool]:
    """The job and the dry-run flag from a command line (see `parse_command` for all flags)."""
    job, dry_run, _ = parse_command(argv)
    return job, dry_run


def parse_command(argv: list[str] | None = None) -> tuple[SlurmJob, bool, bool]:
    """(job, dry-run flag, check flag) from a command line."""
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Render launch/slurm.sbatch for a longtrain run and submit it (or print it).",
    )
    p.add_argument("--dry-run", action="store_true", help="print the script and command only")
    p.add_argument(
        "--skip-check",
        action="store_true",
        help="do not check the trainer's config before rendering (python -m longtrain.check)",
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="also processes per node")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="", help="time limit, e.g. 24:00:00")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per node (one task each)")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="an extra #SBATCH option, e.g. --sbatch-arg exclusive (repeatable)",
    )
    p.add_argument("--job-name", default="longtrain")
    p.add_argument("--run-dir", default="", help="default: <runs-root>/<job-name>-<job id>")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--max-restarts", type=int, default=1, help="torchrun group restarts")
    p.add_argument(
        "--signal-s",
        type=int,
        default=120,
        help="USR1 this many seconds before the time limit: the trainer saves after its current "
        "step, then the job requeues (must cover one step and one checkpoint save)",
    )
    p.add_argument("--requeue-on-term", action="store_true", help="requeue on SIGTERM too")
    p.add_argument("--rdzv-port", type=int, default=0, help="0: derived from the job id")
    p.add_argument("--log-ranks", default="0", help="local ranks on the console, or 'all'")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes")
    p.add_argument("--module", default="longtrain.train", help="module run by torchrun")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.steps=1000")
    a = p.parse_intermixed_args(argv)
    job = SlurmJob(
        nodes=a.nodes,
        gpus_per_node=a.gpus_per_node,
        overrides=a.overrides,
        job_name=a.job_name,
        partition=a.partition,
        time=a.time,
        account=a.account,
        qos=a.qos,
        cpus_per_task=a.cpus_per_task,
        sbatch_args=a.sbatch_arg,
        run_dir=a.run_dir,
        runs_root=a.runs_root,
        max_restarts=a.max_restarts,
        signal_s=a.signal_s,
        requeue_on_term=a.requeue_on_term,
        rdzv_port=a.rdzv_port,
        log_ranks=a.log_ranks,
        python=a.python,
        module=a.module,
    )
    return job, a.dry_run, not a.skip_check


def main(argv: list[str] | None = None) -> int:
    """The `python -m launch.slurm` command; returns the exit status."""
    try:
        job, dry_run, check = parse_command(argv)
        submit(job, dry_run, check=check)
    except (ValueError, RuntimeError) as err:
        print(f"launch.slurm: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
