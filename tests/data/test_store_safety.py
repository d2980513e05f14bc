"""A token store never costs a user a file: only a missing path, an empty directory or one of
our own stores (and nothing else) is written, the output never overlaps its source, and the
temporary directories are fresh names, never someone's directory that gets deleted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from longtrain.config import DataConfig
from longtrain.data import prepare as prepare_mod
from longtrain.data.prepare import prepare
from longtrain.data.sources import Source
from longtrain.data.token_store import TokenStore, TokenStoreWriter, check_replaceable
from longtrain.distributed import DistEnv
from longtrain.errors import DataError
from longtrain.trainer.inputs import open_token_store
from tests.fixtures import write_text_corpus

SPEC = {"kind": "byte", "vocab_size": 259, "bos_id": 256, "eos_id": 257, "pad_id": 258}
ONE_PROCESS = DistEnv(rank=0, world_size=1, local_rank=0, device=None)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content: what must survive a refused write."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _user_dir(path: Path) -> Path:
    """A directory of someone's files, e.g. an exported model."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\x00weights" * 100)
    return path


def _no_reading(monkeypatch):
    """Fail the test if any document is read: refusals must come before any tokenizing."""

    def read(self, limit=None):
        raise AssertionError("a document was read before the output directory was checked")

    monkeypatch.setattr(Source, "document_chunks", read)


def test_prepare_refuses_a_directory_of_user_files(tmp_path, monkeypatch):
    corpus = write_text_corpus(tmp_path / "docs", num_docs=3)
    out = _user_dir(tmp_path / "model")
    before = _snapshot(tmp_path)
    _no_reading(monkeypatch)
    with pytest.raises(DataError, match=r"model'.*not a token store.*'config\.json'"):
        prepare(f"dir:{corpus}", out, show_progress=False)
    assert _snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["docs", "model"]  # no temporary directory left


@pytest.mark.parametrize("where", ["source", "inside", "contains"])
def test_prepare_refuses_an_output_that_overlaps_the_source(tmp_path, monkeypatch, where):
    corpus = write_text_corpus(tmp_path / "docs", num_docs=3)
    out = {"source": corpus, "inside": corpus / "store", "contains": tmp_path}[where]
    before = _snapshot(tmp_path)
    _no_reading(monkeypatch)
    with pytest.raises(DataError, match="overlaps the source"):
        prepare(f"dir:{corpus}", out, show_progress=False)
    assert _snapshot(tmp_path) == before


def test_jsonl_file_and_its_directory_are_the_source_too(tmp_path):
    f = tmp_path / "data" / "c.jsonl"
    f.parent.mkdir()
    f.write_text('{"text": "hello"}\n')
    for out in (f, f.parent, tmp_path / "data" / "c.jsonl" / "x"):
        with pytest.raises(DataError, match="overlaps the source"):
            prepare(f"jsonl:{f}", out, show_progress=False)
    assert f.read_text() == '{"text": "hello"}\n'
    # A sibling directory is fine (the comparison is of resolved paths, not of strings).
    store = prepare(f"jsonl:{f}", tmp_path / "data" / ".." / "store", show_progress=False)
    assert store.num_docs == 1


def test_store_with_extra_user_files_is_not_replaced(tmp_path, monkeypatch):
    corpus = write_text_corpus(tmp_path / "docs", num_docs=3)
    out = tmp_path / "store"
    prepare(f"dir:{corpus}", out, show_progress=False)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    # Reusing it deletes nothing, so that is allowed; a rebuild would replace the directory.
    assert prepare(f"dir:{corpus}", out, show_progress=False).num_docs == 3
    _no_reading(monkeypatch)
    with pytest.raises(DataError, match=r"also holds 'notes\.txt'"):
        prepare(f"dir:{corpus}", out, show_progress=False, force=True)
    assert _snapshot(out) == before


def test_a_file_at_the_output_is_refused_and_an_empty_directory_is_filled(tmp_path):
    corpus = write_text_corpus(tmp_path / "docs", num_docs=3)
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(DataError, match="'.*file': it is a file"):
        prepare(f"dir:{corpus}", tmp_path / "file", show_progress=False)
    assert (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert prepare(f"dir:{corpus}", tmp_path / "empty", show_progress=False).num_docs == 3


def test_a_headerless_or_foreign_header_directory_is_not_a_store(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "tokens.bin").write_bytes(b"\x00\x01")  # our file names, but no marker
    with pytest.raises(DataError, match="not a token store"):
        check_replaceable(d)
    (d / "header.json").write_text('{"format": "somebody.else"}')
    with pytest.raises(DataError, match="not a token store"):
        check_replaceable(d)


def test_swap_rechecks_the_output(tmp_path):
    # The directory appears, holding a user's files, while the store is being written.
    out = tmp_path / "out"
    w = TokenStoreWriter(out, 259, SPEC)
    w.append(np.arange(10))
    _user_dir(out)
    before = _snapshot(out)
    with pytest.raises(DataError, match="not a token store"):
        w.finish()
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_temporary_names_never_collide_with_a_users_directory(tmp_path):
    # The old writer used `<dir>.tmp-<pid>` and `<dir>.old-<pid>` and deleted them if present.
    for kind in ("tmp", "old"):
        _user_dir(tmp_path / f"s.{kind}-{os.getpid()}")
    before = _snapshot(tmp_path)
    for n in (10, 20):  # build, then replace
        with TokenStoreWriter(tmp_path / "s", 259, SPEC) as w:
            w.append(np.arange(n))
    assert TokenStore.open(tmp_path / "s").num_tokens == 20
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("s/")} == before


def test_writing_through_a_symlink_replaces_the_store_it_points_to(tmp_path):
    with TokenStoreWriter(tmp_path / "real", 259, SPEC) as w:
        w.append(np.arange(10))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with TokenStoreWriter(tmp_path / "link", 259, SPEC) as w:
        w.append(np.arange(30))
    assert (tmp_path / "link").is_symlink()
    assert TokenStore.open(tmp_path / "real").num_tokens == 30
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_training_on_an_exported_model_directory_deletes_nothing(tmp_path):
    corpus = write_text_corpus(tmp_path / "docs", num_docs=3)
    model = _user_dir(tmp_path / "model")
    before = _snapshot(model)
    # As the store to train on as it is: not a store.
    with pytest.raises(DataError, match="not a complete token store"):
        open_token_store(DataConfig(store_dir=str(model)), ONE_PROCESS)
    # As the output of a source: refused, not replaced.
    cfg = DataConfig(source=f"dir:{corpus}", store_dir=str(model))
    with pytest.raises(DataError, match="not a token store"):
        open_token_store(cfg, ONE_PROCESS)
    assert _snapshot(model) == before


def test_refusal_names_the_path_before_the_tokenizer_loads(tmp_path, monkeypatch):
    corpus = write_text_corpus(tmp_path / "docs", num_docs=3)

    def no_tokenizer(spec):
        raise AssertionError("the tokenizer was loaded before the overlap check")

    monkeypatch.setattr(prepare_mod, "load_tokenizer", no_tokenizer)
    with pytest.raises(DataError, match=str(corpus)):
        prepare(f"dir:{corpus}", corpus, show_progress=False)
