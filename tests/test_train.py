"""End to end: the training entry point on CPU, its outputs, resume, data parallel, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longtrain.errors import ConfigError
from longtrain.train import load_config, train
from longtrain.trainer.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "data.seq_len=64",
    "train.global_batch=4",
    "optim.warmup_steps=2",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
]


def data_overrides(corpus: Path, store: Path) -> list[str]:
    return [f"data.source=dir:{corpus}", f"data.store_dir={store}"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "longtrain.train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "longtrain.train",
            *args,
        ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_loss_falls_on_real_text(tmp_path, corpus):
    cfg = load_config(
        [
            *SMALL,
            *data_overrides(corpus, tmp_path / "store"),
            "train.steps=30",
            "optim.lr=1e-2",
            "train.ckpt_final=false",
            "logging.plot=false",
        ]
    )
    run_dir = train(cfg, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 30
    # Byte-level text starts near ln(259) = 5.56; 30 steps of a small model must learn
    # the byte distribution at least (unigram entropy of this corpus is ~4.1 nats).
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_cli_run_writes_the_contract_outputs(tmp_path, corpus):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            *SMALL,
            *data_overrides(corpus, tmp_path / "store"),
            "train.steps=3",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in (
        "step",
        "loss",
        "lr",
        "tokens",
        "tokens_per_s",
        "step_time_s",
        "mem_peak_bytes",
        "grad_norm",
        "padding_frac",
        "docs_per_seq",
    ):
        assert all(key in r for r in records), key
    assert all(0 < r["tokens"] <= 4 * 64 for r in records)
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "metrics.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "step_00000003" / ".metadata").is_file()
    assert "metrics:" in proc.stdout and "plot:" in proc.stdout
    assert "attention: torch (auto on cpu)" in proc.stdout.splitlines()[:5]  # said at the start


def test_resume_continues_exactly(tmp_path, corpus):
    base = [
        *SMALL,
        *data_overrides(corpus, tmp_path / "store"),
        "model.dtype=float64",
        "train.steps=8",
        "train.ckpt_every=4",
        "train.keep_last=0",
        "logging.plot=false",
    ]
    full = train(load_config(base), tmp_path / "full")
    # An interrupted run: only the step-4 checkpoint exists, plus the debris of a crash
    # (a half-written later checkpoint and metrics of steps that will be redone).
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", cut / "checkpoints" / "step_00000004")
    (cut / "checkpoints" / "step_00000006.tmp").mkdir()
    (cut / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_metrics(full)[:6])
    )
    train(load_config([*base, "train.resume=auto"]), cut)
    resumed = read_metrics(cut)
    assert [r["step"] for r in resumed] == list(range(8))
    # Same arithmetic in the same order after an exact restore: bitwise equal.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in read_metrics(full)]


def test_corrupt_checkpoint_stops_before_training(tmp_path, corpus):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000005").mkdir(parents=True)
    cfg = load_config(
        [*SMALL, *data_overrides(corpus, tmp_path / "store"), "train.steps=2", "train.resume=auto"]
    )
    with pytest.raises(CheckpointError, match="step_00000005 is incomplete or corrupt"):
        train(cfg, run_dir)
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.seq_len=1", "data.seq_len=1"),
        ("model.dtype=float16", "model.dtype"),
        ("data.packing=greedy", "data.packing"),
        ("parallel.adaptive=true", "parallel.adaptive=true needs sequence parallelism"),
        ("parallel.adaptive_slack=-1", "parallel.adaptive_slack=-1 must be >= 0"),
        ("parallel.cost_link_gbps=0", "parallel.cost_link_gbps=0 must be > 0"),
    ],
)
def test_bad_values_fail_before_training(tmp_path, corpus, override, message):
    cfg = load_config([*SMALL, *data_overrides(corpus, tmp_path / "store"), override])
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_key_and_group_are_errors():
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(["train.no_such_key=1"])
    with pytest.raises(ConfigError, match="no_such_model"):
        load_config(["model=no_such_model"])


def test_missing_corpus_names_the_path(tmp_path):
    cfg = load_config(
        [*SMALL, f"data.source=dir:{tmp_path / 'nowhere'}", f"data.store_dir={tmp_path / 'store'}"]
    )
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        train(cfg, tmp_path / "run")


@pytest.mark.distributed
def test_two_process_data_parallel_equals_one_process(tmp_path, corpus):
    common = [
        *SMALL,
        *data_overrides(corpus, tmp_path / "store"),
        "model.dtype=float64",
        "train.steps=4",
        "train.ckpt_final=false",
        "logging.plot=false",
    ]
    one = run_cli([*common, f"hydra.run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*common, f"hydra.run.dir={tmp_path / 'two'}"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = [r["loss"] for r in read_metrics(tmp_path / "one")]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert [r["tokens"] for r in read_metrics(tmp_path / "one")] == [
        r["tokens"] for r in read_metrics(tmp_path / "two")
    ]
    # float64; the two layouts only reassociate sums of per-token losses and gradients.
    assert l1 == pytest.approx(l2, rel=1e-10)


@pytest.mark.distributed
def test_world_size_not_dividing_batch_is_refused(tmp_path, corpus):
    proc = run_cli(
        [
            *SMALL,
            *data_overrides(corpus, tmp_path / "store"),
            "train.global_batch=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        nproc=2,
    )
    assert proc.returncode != 0
    assert (
        "train.global_batch (3) must be divisible by the data-parallel size (2)"
        in proc.stderr + proc.stdout
    )


def test_gradient_accumulation_equals_one_big_batch(tmp_path, corpus):
    common = [
        *SMALL,
        *data_overrides(corpus, tmp_path / "store"),
        "model.dtype=float64",
        "train.steps=3",
        "train.ckpt_final=false",
        "logging.plot=false",
    ]
    whole = train(load_config(common), tmp_path / "whole")
    accum = train(load_config([*common, "train.micro_batch=1"]), tmp_path / "accum")
    # float64: four micro-batches only reassociate the sums of token losses and gradients.
    assert [r["loss"] for r in read_metrics(accum)] == pytest.approx(
        [r["loss"] for r in read_metrics(whole)], rel=1e-11
    )


def test_variable_length_and_stages_train_and_resume_in_the_right_stage(tmp_path, corpus):
    common = [
        *SMALL,
        *data_overrides(corpus, tmp_path / "store"),
        "model.dtype=float64",
        "logging.plot=false",
    ]
    # Decomposition with a growing curriculum: shapes change per step, tokens per step do not.
    dec = train(
        load_config(
            [
                *common,
                "data.packing=decomposition",
                "data.min_log2=3",
                "data.curriculum=grow_p2",
                "data.loss_weighting=per_document",
                "train.steps=6",
                "train.ckpt_final=false",
            ]
        ),
        tmp_path / "dec",
    )
    recs = read_metrics(dec)
    assert len({r["seq_len"] for r in recs}) > 1
    assert all(r["seqs"] * r["seq_len"] == 4 * 64 for r in recs)
    stages = (
        "data.stages=[{steps:3,seq_len:32,rope_theta:10000},{steps:3,seq_len:64,rope_theta:500000}]"
    )
    full = train(
        load_config([*common, stages, "train.steps=6", "train.ckpt_every=2", "train.keep_last=0"]),
        tmp_path / "full",
    )
    recs = read_metrics(full)
    assert [r["seq_len"] for r in recs] == [32, 32, 32, 64, 64, 64]
    assert [r["stage"] for r in recs] == [0, 0, 0, 1, 1, 1]
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step_00000004", cut / "checkpoints" / "step_00000004")
    train(load_config([*common, stages, "train.steps=6", "train.resume=auto"]), cut)
    resumed = read_metrics(cut)
    assert [r["stage"] for r in resumed] == [1, 1]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in recs[4:]]
