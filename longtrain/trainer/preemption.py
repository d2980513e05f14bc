"""Preemption: SIGTERM or SIGUSR1 makes every rank finish its step, save, and exit.

The handler only records which signal arrived (setting an attribute is all a Python signal
handler should do: it runs between two bytecodes of the main thread, possibly inside a
collective's Python wrapper). The training loop asks `agreed` at every step boundary, a
collective, so all ranks learn together that some rank was signalled (one rank is enough:
a launcher may signal only some processes) and stop after the same step.

Who sends what (see launch/slurm.sbatch): Slurm sends USR1 to the batch shell before the time
limit; the shell forwards it to srun, srun to its tasks (torchrun), and torchrun, told by
`--signals-to-handle` to handle USR1, to its workers: this handler. Under plain torchrun,
SIGTERM to the agent is forwarded the same way. torchrun kills workers that have not exited
`--shutdown-timeout` seconds later (default 30), so that must cover one step and one save.

Start-up: the command (`python -m longtrain.train`) installs a handler before its first
heavy import, so a signal during imports, Hydra's composition or the rendezvous is recorded
too; the handler `loop.start` installs takes over what it recorded (`install`), and the run
stops before its first step with one line (`run`), or before opening the data (`start`).
This module imports no torch at import time, for that first install.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longtrain.distributed import DistEnv

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Records SIGTERM and SIGUSR1 while installed, instead of dying of them.

    `install` (main thread only: Python delivers signals there) replaces the handlers,
    `restore` puts the previous ones back; both are safe to call twice. Outside the main
    thread nothing is installed and the signals keep their previous meaning."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None  # the first signal this process got, if any
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        """Record the signals from now on; returns self. A signal that the handler being
        replaced (another PreemptionHandler's, the command's first) recorded is kept."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            previous = signal.signal(sig, self._record)
            self._previous[sig] = previous
            earlier = getattr(previous, "__self__", None)
            if isinstance(earlier, PreemptionHandler) and self.received is None:
                self.received = earlier.received
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            # None: a handler installed from C, which Python cannot reinstall; default then.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def agreed(self, env: DistEnv) -> signal.Signals | None:
        """Collective: the signal that some rank received (the highest number if several),
        or None; every rank gets the same answer. One all_reduce when distributed."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.received or 0)], device=env.device)  # NCCL: device
        if env.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = int(flag.item())
        return signal.Signals(received) if received else None


__all__ = ["PREEMPT_SIGNALS", "PreemptionHandler"]
