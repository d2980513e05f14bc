"""The pytest section: `pytest -m gpu` in a subprocess, its junit XML read into counts."""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.gpu_check.common import Deadline
from bench.gpu_check.runs import failure_note, run_logged


def parse_junit(path: Path) -> dict:
    """Counts {"passed", "failed", "errors", "skipped", "uncollected"} of a pytest junit XML
    file, the failed / errored test names ("failures", classname::name) and the test modules
    that did not import ("uncollected", `module: the error's last line`)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "uncollected": 0}
    failures, uncollected = [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        error, name = case.find("error"), f"{case.get('classname', '')}::{case.get('name', '')}"
        if error is not None and error.get("message") == "collection failure":
            counts["uncollected"] += 1
            last = [line for line in (error.text or "").splitlines() if line.strip()][-1:]
            uncollected.append(f"{case.get('name')}: {' '.join(last).removeprefix('E ').strip()}")
        elif case.find("failure") is not None or error is not None:
            counts["failed" if error is None else "errors"] += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "uncollected_modules": uncollected}


def _counts_from_log(text: str) -> dict:
    """parse_junit's counts from `pytest -v` lines, for a run killed before its XML."""
    found = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M)
    keys = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    counts = {k: sum(1 for _, s in found if keys[s] == k) for k in keys.values()}
    failures = [n for n, s in found if s in ("FAILED", "ERROR")]
    return {**counts, "uncollected": 0, "failures": failures, "uncollected_modules": []}


def section_pytest(deadline: Deadline, out_dir: Path, marker: str = "gpu") -> dict:
    """`pytest -m <marker>` in a subprocess: counts, failures and modules that did not import
    (collection goes on past them: a missing optional package must not hide every result)."""
    xml_path = out_dir / "gpu_check_runs" / "pytest_gpu.xml"
    xml_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", marker, "-v", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml_path}", "tests"]  # fmt: skip
    log = xml_path.with_suffix(".log")
    proc = run_logged(cmd, log, deadline.left())
    if xml_path.is_file():
        row = parse_junit(xml_path)
    else:
        row = _counts_from_log(log.read_text(errors="replace") if log.is_file() else "")
    row["rc"] = proc["rc"]
    row["status"], row["note"] = pytest_status(row, proc, marker)
    return {"rows": [row]}


def pytest_status(counts: dict, proc: dict, marker: str) -> tuple[str, str]:
    """(status, note) of a pytest run from its counts (parse_junit's) and its process
    (`run_logged`'s). Exit status 1 means failures or modules that did not import; 2-4 and
    a kill mean pytest did not finish."""
    notes = [failure_note(proc, "pytest")] if proc["timed_out"] else []
    if counts.get("uncollected"):
        notes.append(f"{counts['uncollected']} test modules did not import (their tests did "
                     "not run)")  # fmt: skip
    note = "; ".join(notes)
    if proc["rc"] == 5:  # pytest's "no tests collected"
        return "skipped", f"no test carries the {marker!r} marker"
    if counts["failed"] + counts["errors"]:
        return "fail", note
    if proc["timed_out"] or proc["rc"] not in (0, 1):
        return "error", note or failure_note(proc, "pytest")
    if counts["passed"] == 0:
        return "skipped", note or f"all {counts['skipped']} selected tests skipped"
    return "pass", note
