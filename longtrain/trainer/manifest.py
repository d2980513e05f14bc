"""What a checkpoint holds, written when it is saved and checked before it is loaded.

`manifest.json` in a checkpoint directory lists every file of it with its size in bytes and,
unless `train.ckpt_checksums=false`, its sha256. A checkpoint whose files do not match (a
flipped byte, a truncated or missing shard) fails verification and is never loaded.

Cost: every file is read once more at save (to hash what is on disk) and once at load; the
ranks share the files (rank r hashes files r, r + world, ...), so the time is the checkpoint
size / (world size x hash speed): sha256 runs at ~1.4 GB/s on this project's 2-core CI
machine (one core), about 8 s per rank for Llama-3-8B's ~96 GB of fp32 weights and AdamW
state over 8 ranks. `train.ckpt_checksums=false` keeps only the size check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

from longtrain.distributed import DistEnv, broadcast_object

MANIFEST = "manifest.json"
FORMAT = "longtrain.trainer.checkpoint"
VERSION = 1
_CHUNK = 8 << 20  # bytes read per hash update


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(ckpt_dir: Path) -> list[str]:
    """Every regular file under `ckpt_dir` but the manifest, as sorted relative paths."""
    return sorted(
        p.relative_to(ckpt_dir).as_posix()
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def _gather(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def write_manifest(ckpt_dir: Path, env: DistEnv, checksums: bool = True) -> dict:
    """Describe every file of `ckpt_dir` in `ckpt_dir/manifest.json` (collective).

    Every file must already be written and visible to every rank. Each rank hashes its
    share of the files; rank 0 writes the manifest. Returns the manifest (every rank)."""
    names = broadcast_object(_files(ckpt_dir) if env.is_main else None, env)
    mine = {}
    for name in names[env.rank :: env.world_size]:
        entry: dict = {"bytes": (ckpt_dir / name).stat().st_size}
        if checksums:
            entry["sha256"] = _sha256(ckpt_dir / name)
        mine[name] = entry
    files = {k: v for part in _gather(mine, env) for k, v in part.items()}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "hash": "sha256" if checksums else None,
        "files": dict(sorted(files.items())),
    }
    if env.is_main:
        tmp = ckpt_dir / f"{MANIFEST}.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ckpt_dir / MANIFEST)
    return manifest


def read_manifest(ckpt_dir: Path) -> dict:
    """The parsed manifest of `ckpt_dir`; ValueError naming what is wrong."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"no {MANIFEST} (the save did not finish, or longtrain before checksums wrote it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{MANIFEST} is unreadable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} has version {manifest.get('version')}, expected {VERSION}")
    return manifest


def _check_file(ckpt_dir: Path, name: str, entry: dict, checksums: bool) -> str | None:
    path = ckpt_dir / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{name} has {size} bytes, the manifest says {entry.get('bytes')}"
    if checksums and "sha256" in entry and _sha256(path) != entry["sha256"]:
        return f"{name} does not match its sha256 (the file changed after it was saved)"
    return None


def verify_checkpoint(ckpt_dir: Path, env: DistEnv, checksums: bool = True) -> str | None:
    """None when every file of `ckpt_dir` matches its manifest, else one line saying what
    does not (collective: the same answer on every rank).

    Args:
        ckpt_dir: a checkpoint directory.
        env: the ranks that share the hashing (every rank must call this).
        checksums: compare sha256 where the manifest has it; False: sizes only.
    """
    if env.is_main:
        try:
            found = read_manifest(ckpt_dir)
        except ValueError as err:
            found = str(err)
    else:
        found = None
    found = broadcast_object(found, env)
    if isinstance(found, str):
        return found
    names = sorted(found["files"])
    mine = [
        problem
        for name in names[env.rank :: env.world_size]
        if (problem := _check_file(ckpt_dir, name, found["files"][name], checksums))
    ]
    problems = [p for part in _gather(mine, env) for p in part]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


__all__ = ["MANIFEST", "read_manifest", "verify_checkpoint", "write_manifest"]
