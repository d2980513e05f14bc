"""Corpus preparation end to end: sources -> tokens -> store, reuse of an up-to-date store,
rebuild when any input changes, the CLI, and the errors of bad sources."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from longtrain.data.prepare import main, prepare
from longtrain.data.sources import (
    directory_documents,
    jsonl_documents,
    open_source,
    stdlib_documents,
)
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.errors import DataError

EOS = ByteTokenizer.eos_id

TEXTS = {
    "a.txt": "first document\n",
    "b.txt": "naïve café — 日本語 🙂",
    "empty.txt": "",
    "sub/c.txt": "nested " * 50,
    "sub/deeper/d.txt": "x",
}


def _corpus(root: Path) -> Path:
    for rel, text in TEXTS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "notes.md").write_text("not a .txt file")
    return root


def _bytes_eos(text: str) -> list[int]:
    return [*text.encode("utf-8"), EOS]


def _stamp(store_dir: Path) -> tuple[int, int]:
    st = (store_dir / "header.json").stat()
    return st.st_ino, st.st_mtime_ns


def test_directory_documents_order_and_skips(tmp_path):
    docs = list(directory_documents(_corpus(tmp_path)))
    # Sorted relative paths; the empty file and the .md file are not documents.
    assert [name for name, _ in docs] == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    assert [text for _, text in docs] == [TEXTS[n] for n, _ in docs]
    assert [n for n, _ in directory_documents(tmp_path, pattern="*.md")] == ["notes.md"]
    assert len(list(directory_documents(tmp_path, limit=2))) == 2


def test_prepare_from_directory(tmp_path):
    store = prepare(f"dir:{_corpus(tmp_path / 'c')}", tmp_path / "s", show_progress=False)
    names = ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    assert store.num_docs == 4
    for i, name in enumerate(names):
        assert store.doc(i).tolist() == _bytes_eos(TEXTS[name])
        assert ByteTokenizer().decode(store.doc(i)) == TEXTS[name]
    assert store.header["tokenizer"] == ByteTokenizer().spec()
    assert store.header["meta"]["source"] == f"dir:{tmp_path / 'c'}"
    assert store.eos_id == EOS and store.pad_id == ByteTokenizer.pad_id


def test_prepare_limit_docs(tmp_path):
    src = f"dir:{_corpus(tmp_path / 'c')}"
    store = prepare(src, tmp_path / "s", limit_docs=2, show_progress=False)
    assert store.num_docs == 2
    assert store.doc(1).tolist() == _bytes_eos(TEXTS["b.txt"])
    # 0 means all, as in the data config.
    assert prepare(src, tmp_path / "s0", limit_docs=0, show_progress=False).num_docs == 4
    with pytest.raises(ValueError, match="limit_docs must be"):
        prepare(src, tmp_path / "s1", limit_docs=-1, show_progress=False)


def _write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prepare_from_jsonl_file_and_directory(tmp_path):
    d = tmp_path / "j"
    d.mkdir()
    _write_jsonl(d / "1.jsonl", [{"text": "one", "id": 1}, "", {"text": ""}, {"text": "two ü"}])
    _write_jsonl(d / "0.jsonl", [{"text": "zero"}])
    names = [name for name, _ in jsonl_documents(d)]
    assert names == ["0.jsonl:1", "1.jsonl:1", "1.jsonl:4"]

    store = prepare(f"jsonl:{d}", tmp_path / "s", show_progress=False)
    assert [store.doc(i).tolist() for i in range(3)] == [
        _bytes_eos("zero"),
        _bytes_eos("one"),
        _bytes_eos("two ü"),
    ]
    one = prepare(f"jsonl:{d / '1.jsonl'}", tmp_path / "s1", show_progress=False)
    assert one.num_docs == 2


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = _write_jsonl(tmp_path / "x.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"x\.jsonl' line 2 has no field 'text'"):
        list(jsonl_documents(f))
    g = _write_jsonl(tmp_path / "w.jsonl", [{"body": "in body"}])
    assert [t for _, t in jsonl_documents(g, field="body")] == ["in body"]
    f = _write_jsonl(tmp_path / "y.jsonl", [{"text": "ok"}, "{not json"])
    with pytest.raises(ValueError, match=r"y\.jsonl' line 2 is not valid JSON"):
        list(jsonl_documents(f))
    f = _write_jsonl(tmp_path / "z.jsonl", [{"text": 5}])
    with pytest.raises(ValueError, match=r"z\.jsonl' line 1: field 'text' is int"):
        list(jsonl_documents(f))
    f = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    with pytest.raises(ValueError, match="no documents found"):
        list(jsonl_documents(f))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        directory_documents(tmp_path / "nope")  # raised at call time, before iteration
    with pytest.raises(FileNotFoundError, match="nope"):
        prepare(f"jsonl:{tmp_path / 'nope'}", tmp_path / "s", show_progress=False)
    src = tmp_path / "src"  # the store may not lie inside its source: a sibling directory
    src.mkdir()
    with pytest.raises(ValueError, match="no files match"):
        prepare(f"dir:{src}", tmp_path / "s", show_progress=False)
    (src / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no documents found"):
        prepare(f"dir:{src}", tmp_path / "s", show_progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="unknown source 'web:x'"):
        open_source("web:x")
    with pytest.raises(ValueError, match="no .jsonl files"):
        open_source(f"jsonl:{tmp_path}")


def test_reuse_then_rebuild_on_change(tmp_path):
    corpus = _corpus(tmp_path / "c")
    src, out = f"dir:{corpus}", tmp_path / "s"
    prepare(src, out, show_progress=False)
    stamp = _stamp(out)

    # Same inputs: the store is reused, not rewritten.
    again = prepare(src, out, show_progress=False)
    assert _stamp(out) == stamp and again.num_docs == 4

    # A changed file (content and mtime): rebuilt with the new content.
    f = corpus / "a.txt"
    f.write_text("changed\n")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    rebuilt = prepare(src, out, show_progress=False)
    assert _stamp(out) != stamp
    assert rebuilt.doc(0).tolist() == _bytes_eos("changed\n")

    # A different limit: rebuilt.
    stamp = _stamp(out)
    assert prepare(src, out, limit_docs=1, show_progress=False).num_docs == 1
    assert _stamp(out) != stamp

    # A new file: rebuilt.
    (corpus / "e.txt").write_text("new")
    assert prepare(src, out, show_progress=False).num_docs == 5

    # force=True rebuilds even when nothing changed.
    stamp = _stamp(out)
    prepare(src, out, show_progress=False, force=True)
    assert _stamp(out) != stamp


def test_damaged_store_is_rebuilt(tmp_path):
    src, out = f"dir:{_corpus(tmp_path / 'c')}", tmp_path / "s"
    prepare(src, out, show_progress=False)
    data = (out / "tokens.bin").read_bytes()
    (out / "tokens.bin").write_bytes(data[:-4])
    assert prepare(src, out, show_progress=False).num_tokens == len(data) // 2


def test_prepare_with_hf_tokenizer(tmp_path):
    from tests.data.test_tokenizer import _build_hf_tokenizer

    tok_dir = _build_hf_tokenizer(tmp_path / "tok")
    src = f"dir:{_corpus(tmp_path / 'c')}"
    store = prepare(src, tmp_path / "s", tokenizer=str(tok_dir), show_progress=False)
    assert store.header["tokenizer"]["kind"] == "hf" and store.eos_id == 1
    assert store.header["dtype"] == "uint16" and store.vocab_size > 259
    last = store.doc(store.num_docs - 1)
    assert last[-1] == 1 and (last[:-1] != 1).all()
    # Another tokenizer is another input: the byte store at the same path replaces it.
    byte_store = prepare(src, tmp_path / "s", tokenizer="byte", show_progress=False)
    assert byte_store.header["tokenizer"]["kind"] == "byte"


def test_stdlib_documents_small_limit(tmp_path):
    docs = list(stdlib_documents(limit=50))
    names = [n for n, _ in docs]
    assert len(docs) == 50 and names == sorted(names)
    assert all(n.endswith(".py") and "site-packages" not in n for n in names)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert docs[0][1] == (root / names[0]).read_text(encoding="utf-8")

    store = prepare("stdlib", tmp_path / "s", limit_docs=50, show_progress=False)
    assert store.num_docs == 50
    assert store.doc(0).tolist() == _bytes_eos(docs[0][1])
    assert (store.doc_lengths > 1).all()
    ends = store.offsets[1:] - 1
    assert (np.asarray(store.tokens[ends]) == EOS).all()


def test_cli_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "s"
    main(["--source", f"dir:{_corpus(tmp_path / 'c')}", "--out", str(out), "--limit-docs", "3"])
    captured = capsys.readouterr()
    assert "3 docs" in captured.out and str(out) in captured.out
    assert "median" in captured.out and "p99" in captured.out and "seconds" in captured.out
    assert "doc" in captured.err  # the tqdm bar


def test_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    # Before: a bare UnicodeDecodeError that named neither the file nor the line.
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl' line 3 is not valid UTF-8"):
        prepare(f"jsonl:{f}", tmp_path / "s", show_progress=False)
    assert not (tmp_path / "s").exists()
    # A BOM at the start of the file is not an error.
    g = tmp_path / "bom.jsonl"
    g.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    assert [t for _, t in jsonl_documents(g)] == ["one", "two"]
