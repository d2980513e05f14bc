"""Hang and failure diagnostics for the training loop.

A `StepMonitor` knows which step this rank is in and the last operation it started (the loop
and the step call `mark("forward 1/4")`, `mark("optimizer")`, ...). From that it

- prints a heartbeat while a step runs long, every `heartbeat_s` seconds:
  `rank 3 step 120 still running after 180.0 s (last op: backward 2/4, for 175.2 s)`;
- turns an exception inside a step into one line that names the rank, the step and the
  operation, `rank 3 failed at step 120 during backward 2/4: RuntimeError: ...`, then (in a
  distributed run) exits the process at once: its peers' collectives then fail instead of
  waiting, and each of them reports its own step and operation the same way;
- exits a rank whose step made no progress for `hang_timeout_s` (a hang outside collectives,
  or one that the collective timeout does not catch), after printing where it is stuck.

Collective timeouts themselves come from `train.dist_timeout_s` (given to
init_process_group): a rank waiting on a dead or stuck peer gets an error after that long,
and the monitor reports it as above.

    monitor = StepMonitor(rank, heartbeat_s=60, hang_timeout_s=600, exit_on_failure=True)
    with monitor:                      # starts the watcher thread
        for step in range(n):
            with monitor.step(step):
                monitor.mark("forward")
                ...
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TextIO

EXIT_FAILURE = 1  # the exit status of a rank stopped by the monitor


def _short(err: BaseException, limit: int = 500) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    line = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class StepMonitor:
    """Per-rank step tracker: heartbeat, failure report and hang exit (see the module doc).

    Args:
        rank: this process's global rank (named in every message).
        heartbeat_s: print a line every this many seconds while a step runs; 0: never.
        hang_timeout_s: exit when a step made no progress (no `mark`) for this long; 0: never.
        exit_on_failure: after reporting an exception in a step, exit the process with status 1
            instead of re-raising (use it when peers would otherwise wait in a collective).
        stream: where messages go (default: sys.stderr at the time of writing).
        exit_fn: how to exit, after flushing stdout and stderr (default os._exit: no cleanup
            that could block on a broken process group).
        clock: seconds, monotonic (tests pass a fake one and call `poll` themselves).
    """

    def __init__(
        self,
        rank: int,
        heartbeat_s: float = 60.0,
        hang_timeout_s: float = 0.0,
        exit_on_failure: bool = False,
        stream: TextIO | None = None,
        exit_fn: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if heartbeat_s < 0 or hang_timeout_s < 0:
            raise ValueError(
                f"heartbeat_s={heartbeat_s} and hang_timeout_s={hang_timeout_s} must be >= 0 "
                "(0 turns each off)"
            )
        self.rank = rank
        self.heartbeat_s = heartbeat_s
        self.hang_timeout_s = hang_timeout_s
        self.exit_on_failure = exit_on_failure
        self._stream = stream
        self._exit = exit_fn
        self._clock = clock
        self._lock = threading.Lock()
        self._step: int | None = None
        self._op = "start"
        self._t_step = 0.0
        self._t_op = 0.0
        self._next_beat = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._main_thread_id = threading.main_thread().ident

    # -- the loop's side -------------------------------------------------------------------

    def __enter__(self) -> StepMonitor:
        periods = [p for p in (self.heartbeat_s, self.hang_timeout_s) if p > 0]
        if periods and self._thread is None:
            self._tick = min(1.0, min(periods) / 4)
            self._thread = threading.Thread(
                target=self._watch, name=f"step-monitor-rank{self.rank}", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Track optimizer step `step`; report (and in a distributed run, exit on) a failure."""
        now = self._clock()
        with self._lock:
            self._step, self._op = step, "start"
            self._t_step = self._t_op = now
            self._next_beat = now + self.heartbeat_s
        try:
            yield
        except Exception as err:
            self._fail(step, err)
            raise
        finally:
            with self._lock:
                self._step = None

    def mark(self, op: str) -> None:
        """Record that this rank now starts `op` (a short name: "forward 2/4", "optimizer")."""
        with self._lock:
            self._op = op
            self._t_op = self._clock()

    @property
    def current(self) -> tuple[int | None, str]:
        """(step, last operation); step is None between steps."""
        with self._lock:
            return self._step, self._op

    # -- reports ---------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()

    def _fail(self, step: int, err: Exception) -> None:
        _, op = self.current
        self._write(f"rank {self.rank} failed at step {step} during {op}: {_short(err)}")
        if self.exit_on_failure:
            self._write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
            self._write(f"rank {self.rank}: exiting so that the other ranks stop too")
            self._exit_now()

    def _exit_now(self) -> None:
        for stream in (sys.stdout, sys.stderr, self._stream):
            with contextlib.suppress(Exception):  # a closed stream must not stop the exit
                if stream is not None:
                    stream.flush()
        self._exit(EXIT_FAILURE)

    def _main_stack(self) -> str:
        frame = sys._current_frames().get(self._main_thread_id)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)\n"

    def _watch(self) -> None:
        while not self._stop.wait(self._tick):
            if not self.poll():
                return

    def poll(self) -> bool:
        """One look at the step (the watcher thread calls it every tick): print a heartbeat
        when one is due, exit when the step made no progress for `hang_timeout_s`. Returns
        False once it has exited the process."""
        now = self._clock()
        with self._lock:
            step, op = self._step, self._op
            since_step, since_op = now - self._t_step, now - self._t_op
            beat = step is not None and self.heartbeat_s > 0 and now >= self._next_beat
            if beat:
                self._next_beat += self.heartbeat_s
        if step is None:
            return True
        if self.hang_timeout_s > 0 and since_op > self.hang_timeout_s:
            self._write(
                f"rank {self.rank} step {step} made no progress for {since_op:.1f} s during "
                f"{op} (limit {self.hang_timeout_s:g} s): exiting so that the job does not "
                f"hang; where it is stuck:\n{self._main_stack()}"
            )
            self._exit_now()
            return False
        if beat:
            self._write(
                f"rank {self.rank} step {step} still running after {since_step:.1f} s "
                f"(last op: {op}, for {since_op:.1f} s)"
            )
        return True


__all__ = ["EXIT_FAILURE", "StepMonitor"]
