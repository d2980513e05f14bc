"""Profiles (GPU sizes, CPU smoke sizes), the sections bound to them, the machine's
versions, the command line and `main`."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench import gpu_check
from bench.gpu_check.attention import DOC_MEDIAN, section_attention
from bench.gpu_check.common import GIB, MIN_SECTION_S, ROOT, error_text, say
from bench.gpu_check.pytest_run import section_pytest
from bench.gpu_check.report import arm_exits, plain, render_markdown, run_sections
from bench.gpu_check.runs import section_memory, section_sp, section_train
from bench.gpu_check.tiled import section_tiled

RESULTS_DIR = ROOT / "bench" / "results"
SECTIONS = ("pytest", "attention", "tiled", "memory", "train", "sp")
# Seconds per section: together (sp runs only with 2+ GPUs) they fit the default 450 s
# overall budget, which leaves the 8-minute target room for imports and the writes; time a
# section leaves unused goes to the next one (`report.run_sections`).
SECTION_BUDGET_S = {
    "pytest": 90,
    "attention": 130,
    "tiled": 30,
    "memory": 130,
    "train": 70,
    "sp": 90,
}


@dataclass
class Profile:
    """Sizes and overrides of one kind of run: the GPU check, or the CPU smoke run."""

    device: str
    attn_tokens: list[int]
    attn_shape: tuple[int, int, int]  # Hq, K, D
    attn_dtype: torch.dtype
    doc_median: float
    loss_shape: tuple[int, int, int]  # T, E, V
    mlp_shape: tuple[int, int, int]  # T, E, F
    tiled_dtype: torch.dtype
    loss_tile: int
    mlp_budget_mib: float
    memory_seq_lens: list[int]
    memory_overrides: list[str]
    plan_overrides: list[str]
    train_overrides: list[str]
    sp_overrides: list[str] = field(default_factory=list)


FULL_STACK = [
    "train.engine=none",
    "train.global_batch=1",
    "train.memory.mlp_tiles=0",
    "train.memory.mlp_tile_budget_mib=256",
    "train.memory.loss_tile_tokens=4096",
    "train.memory.activation_checkpoint=full",
    "train.memory.offload_activations=true",
]


def gpu_profile() -> Profile:
    """llama3_8b attention shapes, llama3_1b training: what issue 15 asks of one H200."""
    try:  # plan and run both name the kernel: the plan must not assume another one
        from kernels.attention import resolve_backend

        attn = resolve_backend("auto", "cuda")
    except Exception as err:  # the attention section will say what is wrong with it
        say(f"auto attention backend not resolved ({error_text(err)}); planning triton")
        attn = "triton"
    try:  # only the plan's "fits" verdict reads it
        gib = torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:
        gib = 80.0
    llama = ["model=llama3_1b", "model.dtype=bfloat16"]
    return Profile(
        device="cuda",
        attn_tokens=[8192, 16384, 32768, 65536, 131072],
        attn_shape=(32, 8, 128),
        attn_dtype=torch.bfloat16,
        doc_median=DOC_MEDIAN,
        loss_shape=(16384, 2048, 128256),
        mlp_shape=(65536, 2048, 8192),
        tiled_dtype=torch.bfloat16,
        loss_tile=4096,
        mlp_budget_mib=256,
        memory_seq_lens=[32768, 131072],
        memory_overrides=[*llama, f"model.attn_backend={attn}", *FULL_STACK],
        plan_overrides=["plan.world_size=1", "plan.search=false", f"plan.gpu_mem_gib={gib:.1f}"],
        train_overrides=[*llama, "data.seq_len=32768", "train.global_batch=1", "train.engine=none"],
        sp_overrides=[
            "model=tiny",
            "model.dtype=float32",
            "model.attn_backend=triton",
            "data.seq_len=4096",
            "train.global_batch=1",
        ],
    )


def smoke_profile() -> Profile:
    """The same code paths on CPU at tiny sizes (the torch attention backend, the tiny model,
    the planner in CPU mode)."""
    tiny = [
        "model=tiny",
        "model.dtype=float32",
        "model.attn_backend=torch",
        "model.kernel_backend=torch",
    ]
    return Profile(
        device="cpu",
        attn_tokens=[256, 512],
        attn_shape=(4, 2, 16),
        attn_dtype=torch.float32,
        doc_median=96,
        loss_shape=(256, 32, 512),
        mlp_shape=(512, 32, 64),
        tiled_dtype=torch.float32,
        loss_tile=64,
        mlp_budget_mib=0.03,
        memory_seq_lens=[1024],
        memory_overrides=[
            *tiny,
            "train.engine=none",
            "train.global_batch=1",
            "train.memory.mlp_tiles=0",
            "train.memory.mlp_tile_budget_mib=1",
            "train.memory.loss_tile_tokens=256",
            "train.memory.activation_checkpoint=full",
            "train.memory.offload_activations=true",
        ],
        plan_overrides=["plan.world_size=1", "plan.search=false", "plan.device=cpu"],
        train_overrides=[*tiny, "data.seq_len=1024", "train.global_batch=1", "train.engine=none"],
    )


def build_sections(profile: Profile, out_dir: Path, names: list[str]) -> dict:
    """name -> a function of the section's Deadline, bound to the profile's sizes."""
    p = profile
    n_gpus = torch.cuda.device_count() if p.device == "cuda" else 0
    table_ = {
        "pytest": lambda d: section_pytest(d, out_dir),
        "attention": lambda d: section_attention(
            p.device, p.attn_tokens, p.attn_shape, p.attn_dtype, d, p.doc_median
        ),
        "tiled": lambda d: section_tiled(
            p.device, d, p.loss_shape, p.mlp_shape, p.tiled_dtype, p.loss_tile, p.mlp_budget_mib
        ),
        "memory": lambda d: section_memory(
            d,
            out_dir,
            p.memory_seq_lens,
            p.memory_overrides,
            p.plan_overrides,
            tolerance=0.05 if p.device == "cuda" else None,
        ),
        "train": functools.partial(
            section_train,
            out_dir=out_dir,
            overrides=p.train_overrides,
            steps=20 if p.device == "cuda" else 4,
            skip_first=3 if p.device == "cuda" else 1,
        ),
        "sp": lambda d: section_sp(d, out_dir, n_gpus, p.sp_overrides),
    }
    return {name: table_[name] for name in names}


def machine_info(device: str) -> dict:
    """Versions and the device, for reading the results later."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu (smoke)",
        "gpus": 0,
    }
    if device == "cuda":
        try:
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, gpus=torch.cuda.device_count(),
                        gpu_mem_gib=props.total_memory / GIB)  # fmt: skip
        except Exception as err:  # the sections will fail too, and say more
            info["device"] = f"cuda ({error_text(err)})"
    # Installed versions, read without importing (deepspeed's import alone takes seconds);
    # hydra-core and omegaconf are what the training and planning subprocesses need.
    for dist in ("triton", "flash-attn", "hydra-core", "omegaconf", "deepspeed", "numpy"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True, timeout=10
        ).stdout.strip()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=gpu_check.__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}"
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the results")
    ap.add_argument("--budget-s", type=float, default=450.0, help="overall wall-clock budget")
    ap.add_argument(
        "--section-budgets",
        default="",
        help="overrides of the per-section seconds, e.g. attention=200,pytest=60",
    )
    ap.add_argument(
        "--grace-s",
        type=float,
        default=90.0,
        help="a section still running this long after the budget is stopped (results kept)",
    )
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: exercise the code")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    budgets = dict(SECTION_BUDGET_S)
    for item in filter(None, args.section_budgets.split(",")):
        name, _, seconds = item.partition("=")
        budgets[name.strip()] = float(seconds)
    args.budgets = budgets
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every section passed or was skipped, 1 when one failed or
    raised, 0 with one line when there is no GPU (and no --smoke)."""
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to run")
        return 0
    profile = smoke_profile() if args.smoke else gpu_profile()
    result = {
        "benchmark": "gpu_check",
        "started": datetime.datetime.now().isoformat("T", "seconds"),
        "args": plain(vars(args)),
        "machine": machine_info(profile.device),
        "profile": plain(asdict(profile)),
        "sections": {},
    }
    say(
        f"device {result['machine']['device']}, sections {args.sections}, "
        f"budget {args.budget_s:g} s"
    )
    sections = build_sections(profile, args.out, args.sections)
    if profile.device != "cuda" or torch.cuda.device_count() < 2:
        args.budgets["sp"] = MIN_SECTION_S  # it only writes why it did not run
    disarm = arm_exits(result, args.out, args.budget_s + args.grace_s)
    try:
        run_sections(sections, args.budgets, args.budget_s, result, args.out)
    finally:
        disarm()
    print(render_markdown(result), flush=True)
    bad = [n for n, s in result["sections"].items() if s["status"] in ("error", "fail")]
    return 1 if bad else 0
