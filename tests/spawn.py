"""Run a function on N local processes joined in one process group: the one spawn helper that
every distributed test of the project uses.

    results = spawn(fn, 4, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on 4 processes

`fn` must be importable (a module-level function) because processes start with the `spawn`
method. Each process gets a free TCP port for the rendezvous (no environment variables are
set), one intra-op thread (the test machines have few cores), and stdout/stderr/logging lines
prefixed with `[rank N]`. The parent returns the per-rank return values in rank order, or
raises with the first failing rank's traceback; on timeout it kills every process.
"""

from __future__ import annotations

import io
import logging
import multiprocessing.connection
import queue
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port

_PORT_RETRIES = 3  # a free port may be taken between picking it and binding it


class _RankPrefixed(io.TextIOBase):
    """A text stream that prefixes each line written to `stream` with `prefix`."""

    def __init__(self, stream, prefix: str):
        self._stream = stream
        self._prefix = prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _worker(fn, rank, world_size, port, backend, timeout, args, result_q) -> None:
    prefix = f"[rank {rank}] "
    sys.stdout = _RankPrefixed(sys.stdout, prefix)
    sys.stderr = _RankPrefixed(sys.stderr, prefix)
    logging.basicConfig(format=prefix + "%(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(1)
    report = None
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)  # bytes, not shared memory: the parent reads after we exit
        report = (rank, "ok", buf.getvalue())
    except BaseException:
        report = (
            rank,
            "error",
            prefix + traceback.format_exc().rstrip().replace("\n", "\n" + prefix),
        )
    # Report before leaving the group: a failing rank's own error then reaches the parent
    # before the connection errors that its departure causes on the other ranks.
    result_q.put(report)
    result_q.close()
    result_q.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        dist.destroy_process_group()


def _later_errors(result_q, grace_s: float = 1.0) -> str:
    """Errors that other ranks report within `grace_s` (often consequences of the first)."""
    lines = []
    end = time.monotonic() + grace_s
    while (left := end - time.monotonic()) > 0:
        try:
            rank, status, payload = result_q.get(timeout=left)
        except queue.Empty:
            break
        if status == "error":
            last = payload.rstrip().splitlines()[-1]
            lines.append(f"\nthen rank {rank} failed: {last}")
    return "".join(lines)


def _run_once(fn, world_size, args, timeout, backend) -> tuple[list[Any] | None, str | None]:
    """One attempt; returns (results, None) or (None, error text)."""
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, backend, timeout, args, result_q),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    error = None
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                error = f"timeout after {timeout} s; ranks {missing} did not finish"
                break
            try:
                rank, status, payload = result_q.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if r not in results and p.exitcode is not None
                ]
                if dead:
                    # A process that died without reporting (segfault, os._exit, kill): give
                    # the queue a moment in case its report is still in flight.
                    multiprocessing.connection.wait([result_q._reader], timeout=1.0)
                    if result_q.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        error = f"ranks exited without a result (exit codes {codes})"
                        break
                continue
            if status == "error":
                error = f"rank {rank} failed first:\n{payload}"
                error += _later_errors(result_q)
                break
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                p.kill()
            p.join(timeout=10 if error is None else 2)
            if p.is_alive():
                p.kill()
                p.join()
        result_q.close()
    if error is not None:
        return None, error
    return [results[r] for r in range(world_size)], None


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120,
    backend: str = "gloo",
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes in one `backend` group.

    Returns the return values in rank order (they travel with `torch.save`, so tensors are
    fine). Raises RuntimeError with the failing rank's traceback, or TimeoutError when the
    ranks do not all finish within `timeout` seconds (every process is killed either way).
    """
    if world_size < 1:
        raise ValueError(f"spawn needs world_size >= 1, got {world_size}")
    for attempt in range(_PORT_RETRIES):
        results, error = _run_once(fn, world_size, args, timeout, backend)
        if results is not None:
            return results
        port_taken = "address already in use" in error.lower() or "EADDRINUSE" in error
        if not port_taken or attempt == _PORT_RETRIES - 1:
            break
    if error.startswith("timeout"):
        raise TimeoutError(f"spawn({fn.__name__}, {world_size}): {error}")
    raise RuntimeError(f"spawn({fn.__name__}, {world_size}): {error}")


__all__ = ["spawn"]
