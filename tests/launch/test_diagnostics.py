"""longtrain.trainer.diagnostics: heartbeat lines, failure reports that name rank, step and
operation, and ranks that exit instead of hanging (2 gloo processes with short timeouts)."""

from __future__ import annotations

import io
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from longtrain.trainer.diagnostics import EXIT_FAILURE, StepMonitor
from tests.spawn import spawn

COLLECTIVE_TIMEOUT_S = 3  # the process group's timeout in the hang test: short, yet above
# the ~0.1 s an all_reduce of one float takes on a loaded 2-core machine


class _Exited(Exception):
    """Raised by the fake exit function so that a test sees the exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _fake_exit(status: int) -> None:
    raise _Exited(status)


class _Clock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_names_rank_step_and_last_op():
    out, clock = io.StringIO(), _Clock()
    # Not entered: no watcher thread; the test polls at the times it chooses.
    mon = StepMonitor(rank=3, heartbeat_s=0.2, stream=out, clock=clock)
    with mon.step(7):
        mon.mark("backward 2/4")
        for t in (0.1, 0.2, 0.3, 0.46, 0.66, 0.75):
            clock.now = 100.0 + t
            mon.poll()
    clock.now = 102.0
    mon.poll()  # between steps: no heartbeat
    # A beat is due every 0.2 s of the step: the polls at 0.2, 0.46 and 0.66 s print one.
    assert out.getvalue().splitlines() == [
        f"rank 3 step 7 still running after {t} s (last op: backward 2/4, for {t} s)"
        for t in ("0.2", "0.5", "0.7")
    ]


def test_no_thread_and_no_output_when_off():
    out = io.StringIO()
    with StepMonitor(rank=0, heartbeat_s=0, hang_timeout_s=0, stream=out) as mon:
        assert mon._thread is None
        with mon.step(0):
            mon.mark("forward")
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="heartbeat_s=-1"):
        StepMonitor(rank=0, heartbeat_s=-1)


def test_failure_reraises_with_rank_step_and_op_in_one_process():
    out = io.StringIO()
    mon = StepMonitor(rank=0, heartbeat_s=0, stream=out)
    with pytest.raises(ZeroDivisionError), mon.step(4):
        mon.mark("optimizer")
        _ = 1 / 0
    assert (
        out.getvalue()
        == "rank 0 failed at step 4 during optimizer: ZeroDivisionError: division by zero\n"
    )
    assert mon.current == (None, "optimizer")


def test_failure_exits_in_a_distributed_run():
    out = io.StringIO()
    mon = StepMonitor(rank=1, heartbeat_s=0, exit_on_failure=True, stream=out, exit_fn=_fake_exit)
    with pytest.raises(_Exited) as exited, mon.step(9):
        mon.mark("checkpoint save")
        raise OSError("disk full\nsecond line of detail")
    assert exited.value.status == EXIT_FAILURE
    text = out.getvalue()
    assert text.startswith("rank 1 failed at step 9 during checkpoint save: OSError: disk full\n")
    assert "Traceback" in text and "exiting so that the other ranks stop too" in text


def test_watchdog_exits_a_step_without_progress():
    out, clock, exits = io.StringIO(), _Clock(), []
    mon = StepMonitor(
        rank=2, heartbeat_s=0, hang_timeout_s=0.3, stream=out, exit_fn=exits.append, clock=clock
    )
    with mon.step(5):
        mon.mark("ring attention forward")
        clock.now += 0.3
        assert mon.poll() and exits == []  # at the limit, not past it
        clock.now += 0.1
        assert not mon.poll()
    assert exits == [EXIT_FAILURE]
    text = out.getvalue()
    assert text.startswith(
        "rank 2 step 5 made no progress for 0.4 s during ring attention forward (limit 0.3 s)"
    ), text
    assert "test_watchdog_exits_a_step_without_progress" in text  # where the main thread was


def _collective_step(rank: int, world_size: int, hang: str, timeout_s: int) -> None:
    """Three steps of (local work, all_reduce); rank 1 hangs in step 2 as `hang` says. The
    all_reduce runs in a group whose timeout is `timeout_s` (train.dist_timeout_s's role)."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    mon = StepMonitor(
        rank,
        heartbeat_s=1.0,
        hang_timeout_s=2.0 if hang == "local" else 0.0,
        exit_on_failure=True,
    )
    x = torch.ones(1)
    with mon:
        for step in range(3):
            with mon.step(step):
                mon.mark("forward")
                if step == 2 and rank == 1:
                    time.sleep(60)  # a rank stuck outside any collective
                mon.mark("loss all_reduce")
                dist.all_reduce(x, group=group)


@pytest.mark.distributed
def test_peer_timeout_names_step_and_op_within_the_timeout(tmp_path, capfd):
    """Rank 1 sleeps in step 2; rank 0 waits in the all_reduce until the collective timeout,
    then reports and exits, within the timeout plus a margin."""
    with pytest.raises(RuntimeError, match=f"exit codes {{0: {EXIT_FAILURE}}}"):
        spawn(_collective_step, 2, "collective", COLLECTIVE_TIMEOUT_S, timeout=60)
    out = capfd.readouterr()
    text = out.out + out.err
    assert re.search(
        r"rank 0 failed at step 2 during loss all_reduce: \w+: .*[Tt]imed? ?out", text
    ), text
    assert "rank 1 step 2 still running after" in text  # the heartbeat of the stuck rank


@pytest.mark.distributed
def test_watchdog_stops_every_rank_of_a_stuck_step(tmp_path, capfd):
    """With a 60 s collective timeout, the 2 s watchdog stops both ranks: rank 1 stuck in its
    own code (its stack shows where), rank 0 waiting for it in the all_reduce."""
    with pytest.raises(RuntimeError, match="exited without a result"):
        spawn(_collective_step, 2, "local", 60, timeout=60)
    out = capfd.readouterr()
    text = out.out + out.err
    stuck = re.search(r"rank 1 step 2 made no progress for (\d+\.\d) s during forward.*\n", text)
    assert stuck and float(stuck.group(1)) >= 2.0, text  # not before the 2 s limit
    assert "time.sleep(60)" in text[stuck.end() :]
    # Rank 0 reports either its own watchdog or the error of its peer's exit; both name the
    # step and the operation.
    assert re.search(
        r"rank 0 (failed at step 2|step 2 made no progress .*) during loss all_reduce", text
    ), text
