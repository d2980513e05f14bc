"""`make bench`: run every benchmark in turn; each prints its table and writes
bench/results/<name>.json."""

from __future__ import annotations

import importlib
import sys
import traceback

BENCHMARKS = [
    "bench.packing",
    "bench.kernels",
    "bench.sp_attention",
    "bench.alst",
    "bench.memory",
    "bench.startup_memory",
    "bench.ckpt_save",
]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        try:
            importlib.import_module(name).main([])
        except ModuleNotFoundError as err:
            print(f"skipped: {err}")
        except Exception:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
