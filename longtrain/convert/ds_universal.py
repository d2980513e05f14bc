"""Convert a DeepSpeed checkpoint to DeepSpeed's universal format, so it resumes on another
layout (world size, ZeRO stage, SP degree).

    python -m longtrain.convert.ds_universal RUN_DIR_OR_CHECKPOINT [--workers 4]

A DeepSpeed ZeRO checkpoint holds each rank's partition of the flat float32 master weights
and optimizer state, so it loads only on the world size and ZeRO stage that wrote it.
DeepSpeed's `ds_to_universal` rewrites it as one file per parameter and state (fp32,
exp_avg, exp_avg_sq, step) that any layout can slice; the engine loads that with its
`load_universal` switch (`longtrain.distributed.deepspeed_zero.DeepSpeedRun.load` turns it
on by itself when the layout differs and a conversion is there). ZeRO-1 and ZeRO-2
checkpoints only (either resumes at either stage); `ZERO3_UNIVERSAL_PROBLEM` says what was
measured with ZeRO-3.

The conversion goes into `<checkpoint>/universal/` and is complete only once it carries its
own manifest (sizes and sha256, `longtrain.trainer.manifest`): it is written under
`universal.tmp/` and renamed, so a crash leaves nothing a resume would take. The
checkpoint's own files are read, never changed. It runs in one process, offline (no GPUs,
no process group); host memory: one rank's optimizer partition per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from longtrain.distributed import single_process_env
from longtrain.distributed.deepspeed_zero import (
    STATE_MARKER,
    UNIVERSAL_DIR,
    ZERO3_UNIVERSAL_PROBLEM,
)
from longtrain.errors import DataError, report_errors
from longtrain.trainer.manifest import MANIFEST, verify_checkpoint, write_manifest


def convert_to_universal(ckpt: str | Path, workers: int = 4) -> Path:
    """Write `<ckpt>/universal/` from DeepSpeed checkpoint `ckpt` (a checkpoint directory of
    a train.engine=deepspeed run, verified first); returns it. An existing complete
    conversion is verified and kept. Raises DataError for anything that is not such a
    checkpoint."""
    from longtrain.convert.hf_export import resolve_checkpoint

    _, ckpt = resolve_checkpoint(ckpt)  # a verified, complete checkpoint
    if not (ckpt / STATE_MARKER).is_file():
        raise DataError(
            f"{ckpt} is not a DeepSpeed checkpoint (no {STATE_MARKER}); train.engine=fsdp2 "
            "checkpoints load on any layout as they are"
        )
    stage = json.loads((ckpt / STATE_MARKER).read_text())["zero_stage"]
    if stage == 3:
        raise DataError(f"{ckpt} is a ZeRO-3 checkpoint: {ZERO3_UNIVERSAL_PROBLEM}")
    out = ckpt / UNIVERSAL_DIR
    one = single_process_env()
    if (out / MANIFEST).is_file() and verify_checkpoint(out, one) is None:
        return out
    staging = ckpt / f"{UNIVERSAL_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # debris of a conversion that crashed
    shutil.rmtree(out, ignore_errors=True)  # one that does not verify
    _run_ds_to_universal(ckpt, staging / UNIVERSAL_DIR, workers)
    write_manifest(staging / UNIVERSAL_DIR, one)
    os.replace(staging / UNIVERSAL_DIR, out)
    shutil.rmtree(staging)
    return out


def _run_ds_to_universal(ckpt: Path, out: Path, workers: int) -> None:
    """DeepSpeed's converter, in this process. Our engine does not record the Megatron-style
    `universal_checkpoint_info` (no tensor or pipeline parallelism to describe), so its
    default is injected."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(out),
        num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)


def main(argv: list[str] | None = None) -> None:
    """The `python -m longtrain.convert.ds_universal` command: a user error is one line,
    exit status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m longtrain.convert.ds_universal",
        description="Convert a DeepSpeed checkpoint so that it resumes on another layout.",
    )
    parser.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint dir")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="converter processes"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")

    def run() -> Path:
        return convert_to_universal(args.checkpoint, args.workers)

    out = report_errors("longtrain.convert.ds_universal", run)
    print(f"converted: {out}; resume with train.resume=auto on any layout")


if __name__ == "__main__":
    main()

__all__ = ["convert_to_universal"]
