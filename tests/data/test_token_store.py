"""Token store: exact round trips in every dtype, atomic finalisation, and the validation
errors `TokenStore.open` gives for damaged stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longtrain.data import token_store
from longtrain.data.token_store import TokenStore, TokenStoreWriter, token_dtype
from tests.fixtures import make_store

BYTE_SPEC = {"kind": "byte", "vocab_size": 259, "bos_id": 256, "eos_id": 257, "pad_id": 258}


def _spec(vocab_size: int) -> dict:
    return {"kind": "test", "vocab_size": vocab_size, "bos_id": None, "eos_id": 0, "pad_id": 0}


def _random_docs(rng, vocab_size: int, n: int = 37) -> list[np.ndarray]:
    # Heavy-tailed lengths with empties mixed in, ids spanning the whole vocabulary.
    lengths = rng.geometric(0.02, size=n) - 1
    lengths[[3, 10]] = 0
    docs = [rng.integers(0, vocab_size, size=int(k)) for k in lengths]
    docs[0][:1] = vocab_size - 1  # the largest id must survive the dtype
    return docs


def _write(path, docs, vocab_size, **kw) -> None:
    with TokenStoreWriter(path, vocab_size, _spec(vocab_size), **kw) as w:
        for d in docs:
            w.append(d)


@pytest.mark.parametrize(
    "vocab_size,dtype", [(200, "uint8"), (259, "uint16"), (65536, "uint16"), (70000, "uint32")]
)
def test_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    docs = _random_docs(rng, vocab_size)
    _write(tmp_path / "s", docs, vocab_size, fingerprint="abc", meta={"source": "test"})
    store = TokenStore.open(tmp_path / "s")

    kept = [d for d in docs if d.size]
    assert store.header["dtype"] == dtype and store.tokens.dtype == np.dtype(dtype)
    assert store.num_docs == len(kept) == len(store)
    assert store.header["skipped_empty_docs"] == len(docs) - len(kept)
    assert store.num_tokens == sum(d.size for d in kept)
    assert store.vocab_size == vocab_size
    assert store.header["fingerprint"] == "abc" and store.header["meta"] == {"source": "test"}
    assert store.offsets.dtype == np.int64 and store.offsets[0] == 0
    assert store.doc_lengths.dtype == np.int64
    np.testing.assert_array_equal(store.doc_lengths, [d.size for d in kept])
    for i, d in enumerate(kept):
        np.testing.assert_array_equal(store.doc(i), d)
    np.testing.assert_array_equal(store.slice(0, 2, 5), kept[0][2:7])
    assert store.slice(1, 0, 0).size == 0
    assert not store.tokens.flags.writeable


def test_views_do_not_copy(tmp_path):
    _write(tmp_path / "s", [np.arange(50), np.arange(30)], 259)
    store = TokenStore.open(tmp_path / "s")
    assert np.shares_memory(store.doc(1), store.tokens)
    assert np.shares_memory(store.slice(0, 10, 20), store.tokens)


def test_special_ids_come_from_the_tokenizer_spec(tmp_path):
    with TokenStoreWriter(tmp_path / "s", 259, BYTE_SPEC) as w:
        w.append([1, 2, 257])
    store = TokenStore.open(tmp_path / "s")
    assert (store.bos_id, store.eos_id, store.pad_id) == (256, 257, 258)
    assert store.tokenizer_spec == BYTE_SPEC


def test_out_of_range_access(tmp_path):
    _write(tmp_path / "s", [np.arange(5), np.arange(3)], 259)
    store = TokenStore.open(tmp_path / "s")
    with pytest.raises(IndexError, match="document 2 out of range"):
        store.doc(2)
    with pytest.raises(IndexError, match=r"slice \[2, 6\) is outside document 1 of length 3"):
        store.slice(1, 2, 4)
    with pytest.raises(IndexError):
        store.slice(0, -1, 2)


def test_token_dtype_limits():
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="does not fit uint32"):
        token_dtype(2**32 + 1)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        token_dtype(0)


def test_append_rejects_bad_documents(tmp_path):
    with TokenStoreWriter(tmp_path / "s", 259, BYTE_SPEC) as w:
        w.append([1, 2])
        with pytest.raises(ValueError, match="document 1 holds token id 259"):
            w.append([3, 259])
        with pytest.raises(ValueError, match="token id -4"):
            w.append([-4])
        with pytest.raises(ValueError, match="1-D"):
            w.append([[1, 2]])
        with pytest.raises(ValueError, match="integers"):
            w.append([0.5])
    assert TokenStore.open(tmp_path / "s").num_docs == 1


def test_empty_store_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no non-empty documents"):
        _write(tmp_path / "s", [np.array([], dtype=np.int64)], 259)
    assert not (tmp_path / "s").exists()
    assert os.listdir(tmp_path) == []


def test_abandoned_writer_leaves_no_store(tmp_path):
    # A process that dies mid-write never reaches finish(): only the .tmp-<pid> dir exists.
    w = TokenStoreWriter(tmp_path / "s", 259, BYTE_SPEC)
    w.append(np.arange(100))
    w._file.flush()
    assert not (tmp_path / "s").exists()
    with pytest.raises(FileNotFoundError, match="python -m longtrain.data.prepare"):
        TokenStore.open(tmp_path / "s")
    with pytest.raises(ValueError, match="not a complete token store"):
        TokenStore.open(w.tmp_path)
    w.abort()
    assert os.listdir(tmp_path) == []


def test_exception_inside_writer_aborts(tmp_path):
    writer = TokenStoreWriter(tmp_path / "s", 259, BYTE_SPEC)
    with pytest.raises(RuntimeError, match="boom"), writer as w:
        w.append(np.arange(10))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_crash_at_rename_keeps_the_old_store(tmp_path, monkeypatch):
    path = tmp_path / "s"
    _write(path, [np.arange(10)], 259, fingerprint="old")

    # Crash at the moment the finished new store would move into place: the temporary
    # directory is complete (header written) but `path` must still hold the old store.
    real_replace = os.replace

    def crash_on_new_store(src, dst):
        if ".tmp-" in os.fspath(src):
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(token_store.os, "replace", crash_on_new_store)
    with pytest.raises(KeyboardInterrupt):
        _write(path, [np.arange(20), np.arange(5)], 259, fingerprint="new")
    monkeypatch.undo()

    store = TokenStore.open(path)
    assert store.header["fingerprint"] == "old" and store.num_docs == 1
    assert sorted(os.listdir(tmp_path)) == ["s"]


CRASH_SCRIPT = """
import os, sys
import numpy as np
from longtrain.data import token_store
real_replace = os.replace
def replace_then_die(src, dst):
    if ".tmp-" in os.fspath(src):
        os._exit(17)  # killed between moving the old store aside and moving the new one in
    real_replace(src, dst)
token_store.os.replace = replace_then_die
with token_store.TokenStoreWriter(sys.argv[1], 259, {"eos_id": 257, "pad_id": 258}) as w:
    w.append(np.arange(20))
"""


def test_process_killed_mid_finish_leaves_no_store(tmp_path):
    # A real crash (no cleanup runs) in the worst window of the two renames.
    path = tmp_path / "s"
    _write(path, [np.arange(10)], 259)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(path)], env=env)
    assert proc.returncode == 17
    leftovers = sorted(os.listdir(tmp_path))
    assert [n.split("-")[0] for n in leftovers] == ["s.old", "s.tmp"]
    with pytest.raises(FileNotFoundError, match="no token store"):
        TokenStore.open(path)


def test_rewrite_replaces_the_old_store(tmp_path):
    path = tmp_path / "s"
    _write(path, [np.arange(10)], 259, fingerprint="old")
    _write(path, [np.arange(20), np.arange(5)], 259, fingerprint="new")
    store = TokenStore.open(path)
    assert store.header["fingerprint"] == "new" and store.num_docs == 2
    assert sorted(os.listdir(tmp_path)) == ["s"]


@pytest.fixture
def small_store(tmp_path):
    path = tmp_path / "s"
    _write(path, [np.arange(10), np.arange(250), np.arange(7)], 259)
    return path


def test_open_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python -m longtrain\.data\.prepare"):
        TokenStore.open(tmp_path / "nowhere")


def test_open_token_id_out_of_vocab(small_store, monkeypatch):
    # Corrupt one token of document 1 (token 3) to 300 >= vocab 259.
    tokens = np.memmap(small_store / "tokens.bin", dtype=np.uint16, mode="r+")
    tokens[10 + 3] = 300
    tokens.flush()
    del tokens
    with pytest.raises(ValueError, match=r"token id 300 at document 1 \(token 3\)"):
        TokenStore.open(small_store)
    # The scan is chunked: the same error when the bad id sits in a later chunk.
    monkeypatch.setattr(token_store, "_CHECK_CHUNK", 4)
    with pytest.raises(ValueError, match=r"token id 300 at document 1 \(token 3\)"):
        TokenStore.open(small_store)
    assert TokenStore.open(small_store, check_tokens=False).doc(1)[3] == 300


def test_open_truncated_tokens(small_store):
    data = (small_store / "tokens.bin").read_bytes()
    (small_store / "tokens.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"tokens.bin.*532 bytes, expected 534.*truncated"):
        TokenStore.open(small_store)


def test_open_missing_header(small_store):
    (small_store / "header.json").unlink()
    with pytest.raises(ValueError, match="not a complete token store"):
        TokenStore.open(small_store)


def _edit_header(path, **changes):
    header = json.loads((path / "header.json").read_text())
    header.update(changes)
    (path / "header.json").write_text(json.dumps(header))


def test_open_wrong_version(small_store):
    _edit_header(small_store, version=99)
    with pytest.raises(ValueError, match="format version 99"):
        TokenStore.open(small_store)


def test_open_offsets_disagree_with_header(small_store):
    _edit_header(small_store, num_docs=4)
    with pytest.raises(ValueError, match=r"offsets.npy.*expected int64 \(5,\)"):
        TokenStore.open(small_store)
    _edit_header(small_store, num_docs=3, num_tokens=268)
    with pytest.raises(ValueError, match="num_tokens 268"):
        TokenStore.open(small_store)


def test_open_dtype_disagrees_with_vocab(small_store):
    _edit_header(small_store, vocab_size=70000)
    with pytest.raises(ValueError, match="dtype uint16 does not match vocab_size 70000"):
        TokenStore.open(small_store)


def test_open_refuses_special_ids_outside_the_header_vocab(tmp_path):
    # A real store, its header edited to vocab_size 258: the dtype (uint16) still matches and
    # every stored token (EOS 257 the largest) is < 258, but PAD 258 would index past the
    # embedding. Before: opened fine.
    path = make_store(tmp_path, num_docs=5).path
    _edit_header(path, vocab_size=258)
    with pytest.raises(ValueError, match=r"pad_id 258 is outside 0\.\.257 \(vocab_size 258\)"):
        TokenStore.open(path)
    with pytest.raises(ValueError, match="pad_id 258"):
        TokenStore.open(path, check_tokens=False)  # cheap: checked even without the scan
    # Specials made small enough, the scan finds the EOS tokens and names the document.
    spec = {**BYTE_SPEC, "bos_id": None, "pad_id": 0, "eos_id": 0}
    _edit_header(path, vocab_size=257, tokenizer=spec)
    with pytest.raises(ValueError, match=r"token id 257 at document 0 \(token \d+\) is >= vocab"):
        TokenStore.open(path)


def test_writer_refuses_special_ids_outside_the_vocab(tmp_path):
    with pytest.raises(ValueError, match=r"eos_id 300 is outside 0\.\.258"):
        TokenStoreWriter(tmp_path / "s", 259, {**BYTE_SPEC, "eos_id": 300})
    assert os.listdir(tmp_path) == []
