"""Shared pytest fixtures (kept minimal).

Without a GPU, Triton kernels run through Triton's CPU interpreter. `triton.jit` reads
TRITON_INTERPRET when a kernel is defined, i.e. when a kernel module is first imported, and
the model imports kernel modules: so it is set here, in the root conftest, which pytest loads
before any test module (tests/kernels/triton/conftest.py alone comes too late once another
directory's tests imported the model). With a GPU nothing is set.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """60 small .txt documents (tests.fixtures.write_text_corpus); read-only for tests."""
    from tests.fixtures import write_text_corpus

    return write_text_corpus(tmp_path_factory.mktemp("corpus"), num_docs=60)


@pytest.fixture(scope="session")
def hf_corpus(tmp_path_factory) -> Path:
    """30 small .txt documents: few enough that a tiny HF model's steps see them recur."""
    from tests.fixtures import write_text_corpus

    return write_text_corpus(tmp_path_factory.mktemp("hf_corpus"), num_docs=30)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved random-weight tiny Llama, Qwen2 and Mistral models (tests/hf_cases.py)."""
    pytest.importorskip("transformers")
    from tests.hf_cases import FAMILIES, save_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf_model(make(), root / name) for name, make in FAMILIES.items()}
