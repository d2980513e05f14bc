"""The results: markdown and JSON written after every section, section statuses, the
section runner with its budgets, and the ways out (watchdog, SIGTERM)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import write_results
from bench.gpu_check.common import MIN_SECTION_S, Deadline, error_text, say
from bench.gpu_check.runs import CHILD_GROUPS, kill_group

STATUS_ORDER = ("error", "fail", "skipped", "pass", "ok")

COLUMNS = {  # section -> [(row key, header)]
    "pytest": [("passed", "passed"), ("failed", "failed"), ("errors", "errors"),
               ("skipped", "skipped"), ("uncollected", "modules not imported"),
               ("status", "status"), ("note", "note")],
    "attention": [("tokens", "T"), ("documents", "docs"), ("longest", "longest"),
                  ("backend", "backend"), ("status", "status"), ("fwd_ms", "fwd ms"),
                  ("fwd_tflops", "fwd TFLOP/s"), ("fwd_bwd_ms", "fwd+bwd ms"),
                  ("fwd_bwd_tflops", "fwd+bwd TFLOP/s"), ("err_out", "err out"),
                  ("err_lse", "err lse"), ("err_dq", "err dq"), ("err_dk", "err dk"),
                  ("err_dv", "err dv"), ("note", "note")],
    "tiled": [("kernel", "kernel"), ("variant", "variant"), ("status", "status"),
              ("ms", "ms"), ("peak_gib", "peak extra GiB"), ("memory_ratio", "vs materialised"),
              ("max_diff", "max abs diff"), ("note", "note")],
    "memory": [("seq_len", "seq_len"), ("predicted_gib", "planned GiB"),
               ("measured_gib", "measured GiB"), ("ratio", "measured / planned"),
               ("status", "status (within 5%)"), ("note", "note")],
    "train": [("tokens_per_s", "tokens/s"), ("tflops", "TFLOP/s"), ("mfu", "MFU"),
              ("mem_peak_gib", "peak GiB"), ("steps", "steps"), ("median_over", "median of"),
              ("status", "status"), ("note", "note")],
    "sp": [("check", "check"), ("status", "status"), ("value", "max rel loss diff"),
           ("note", "note")],
}  # fmt: skip


def fmt(value) -> str:
    """A table cell: '-' for None, 3 significant digits for floats, '|' escaped."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(columns: list[tuple[str, str]], rows: list[dict]) -> list[str]:
    """Markdown table lines of `rows` (missing keys render '-')."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]


def section_status(body: dict) -> str:
    """error or fail if any row or goal says so; skipped if every one was skipped; else pass
    if any passed a goal, else ok (measured, no goal)."""
    found = [r.get("status", "ok") for r in [*body.get("rows", []), *body.get("goals", [])]]
    for status in ("error", "fail"):
        if status in found:
            return status
    if found and all(s == "skipped" for s in found):
        return "skipped"
    return "pass" if "pass" in found else "ok"


def status_counts(body: dict) -> str:
    """'3 ok, 2 skipped': the rows' statuses, for the summary table."""
    found = [r.get("status", "ok") for r in body.get("rows", [])]
    return ", ".join(f"{found.count(s)} {s}" for s in STATUS_ORDER if s in found)


def render_markdown(result: dict) -> str:
    """The summary table, then each section's table, goals and failures."""
    machine = result.get("machine", {})
    lines = [f"# GPU check: {machine.get('device', '?')}, {result.get('started', '')}", ""]
    summary = [
        {
            "section": name,
            "status": s.get("status"),
            "seconds": s.get("seconds"),
            "note": s.get("error") or s.get("note", ""),
        }
        for name, s in result["sections"].items()
    ]
    lines += table(
        [("section", "section"), ("status", "status"), ("seconds", "seconds"), ("note", "note")],
        summary,
    )
    for name, s in result["sections"].items():
        lines += ["", f"## {name}: {s.get('status')}", ""]
        if s.get("error"):
            lines.append(f"error: {fmt(s['error'])}")
        elif s.get("note") and not s.get("rows"):
            lines.append(fmt(s["note"]))
        if s.get("rows"):
            lines += table(COLUMNS.get(name, [("status", "status"), ("note", "note")]), s["rows"])
        for goal in s.get("goals", []):
            lines.append(
                f"\ngoal {goal['name']} {goal['target']}: {fmt(goal['value'])} "
                f"**{goal['status']}** {goal.get('note', '')}".rstrip()
            )
        for row in s.get("rows", []):
            lines += [f"- failed: `{n}`" for n in row.get("failures", [])]
            lines += [f"- did not import: {fmt(n)}" for n in row.get("uncollected_modules", [])]
    return "\n".join(lines) + "\n"


def finite(obj):
    """`obj` with non-finite floats as strings ('nan', 'inf'): strict JSON readers choke."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def plain(obj):
    """`obj` as JSON types (paths, dtypes and the like as their str)."""
    return json.loads(json.dumps(obj, default=str))


def write_outputs(result: dict, out_dir: Path) -> None:
    """<out>/gpu_check.json and <out>/gpu_check.md, rewritten whole."""
    write_results(out_dir / "gpu_check.json", finite(result))
    (out_dir / "gpu_check.md").write_text(render_markdown(result))


def give_up(result: dict, out_dir: Path, why: str) -> None:
    """Mark the running section as an error with `why`, write and print the results, then
    kill the subprocesses' groups: the way out of a hang or a SIGTERM."""
    running = result.pop("running", None)
    if running:
        seconds = round(time.time() - running["since"], 1)
        result["sections"][running["section"]] = {
            "status": "error", "error": why, "seconds": seconds, "budget_s": running["budget_s"]
        }  # fmt: skip
    write_outputs(result, out_dir)
    print(render_markdown(result), flush=True)
    for pgid in list(CHILD_GROUPS):
        kill_group(pgid)


def arm_exits(result: dict, out_dir: Path, after_s: float) -> Callable[[], None]:
    """A watchdog that gives up (`give_up`, exit status 1) `after_s` seconds from now, for a
    section stuck in a GPU call no budget can interrupt; and the same on SIGTERM (143).
    Returns the function that disarms both."""

    def on_timer():
        give_up(result, out_dir, f"still running {after_s:.0f} s into the check: stopped")
        os._exit(1)

    def on_sigterm(signum, frame):
        give_up(result, out_dir, "SIGTERM: stopped")
        os._exit(143)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    timer = threading.Timer(after_s, on_timer)
    timer.daemon = True
    timer.start()

    def disarm():
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)

    return disarm


def run_sections(
    sections: dict[str, Callable[[Deadline], dict]],
    budgets: dict[str, float],
    total_s: float,
    result: dict,
    out_dir: Path,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Run each section under its budget, catching its error; results into
    result["sections"][name], written out after each one. A section's budget is its own
    (`budgets`) plus whatever the overall `total_s` has left beyond the budgets of the
    sections after it (so time saved early goes to the next section), never more than
    what is left overall. `clock`: the budgets' clock (tests pass a frozen one)."""
    overall = Deadline(total_s, clock)
    names = list(sections)
    for i, (name, fn) in enumerate(sections.items()):
        left = overall.left()
        reserved = sum(budgets.get(n, 0.0) for n in names[i + 1 :])
        if left < MIN_SECTION_S:
            entry = {
                "status": "skipped",
                "seconds": 0.0,
                "note": f"overall budget (--budget-s {total_s:g}) spent",
            }
        else:
            budget = min(left, max(budgets.get(name, left), left - reserved))
            say(f"{name}: start (budget {budget:.0f} s)")
            t0 = clock()
            result["running"] = {"section": name, "since": time.time(), "budget_s": budget}
            try:
                entry = fn(Deadline(budget, clock))
                entry["status"] = entry.get("status") or section_status(entry)
                entry.setdefault("note", status_counts(entry))
            except Exception as err:  # recorded; the next section still runs
                entry = {
                    "status": "error",
                    "error": error_text(err),
                    "traceback": traceback.format_exc()[-3000:],
                }
            entry.update(seconds=round(clock() - t0, 1), budget_s=budget)
            result.pop("running", None)
        result["sections"][name] = entry
        say(f"{name}: {entry['status']} {entry.get('error', entry.get('note', ''))}")
        write_outputs(result, out_dir)
    return result
