"""Benchmarks: each prints a table and writes its JSON under bench/results/."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path, result: object) -> None:
    """Write `result` as indented JSON to `path` (its directory created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
