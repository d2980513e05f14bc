"""Shared pytest fixtures (kept minimal)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, then restore the setting.

    For small test shapes threads only add cost, and on a shared 2-core machine each parallel
    region can stall ~8 ms waiting for a descheduled OpenMP thread (measured: a kernels test
    file took 88 s with 2 threads under load, 14 s with 1). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
