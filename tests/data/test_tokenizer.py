"""Tokenizers: exact round trips (byte-level and a tiny byte-level BPE built here), special
ids, and the errors a user meets with a bad tokenizer spec."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from longtrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

TEXTS = [
    "",
    "hello world\n",
    "naïve café — 日本語のテキスト 🙂\ttabs\r\nand CRLF",
    "\x00\x7f control bytes \u00ff",
]


@pytest.mark.parametrize("text", TEXTS, ids=["empty", "ascii", "non-ascii", "controls"])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_special_ids_are_skipped_and_bad_ids_refused():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    ids = np.concatenate([[tok.bos_id], tok.encode("é!"), [tok.eos_id, tok.pad_id]])
    assert tok.decode(ids) == "é!"
    # A slice cut inside a multi-byte character decodes with U+FFFD instead of raising.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="token id 259"):
        tok.decode([65, 259])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_byte_lone_surrogate_becomes_question_mark():
    # JSON can carry lone surrogates ("\ud800") that UTF-8 cannot encode.
    assert ByteTokenizer().decode(ByteTokenizer().encode("a\ud800b")) == "a?b"


def test_byte_spec_and_load():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    spec = tok.spec()
    assert json.loads(json.dumps(spec)) == spec
    assert isinstance(load_tokenizer(spec), ByteTokenizer)


def test_load_missing_directory(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(str(missing))


def test_load_bad_spec(tmp_path):
    with pytest.raises(ValueError, match="empty tokenizer spec"):
        load_tokenizer("")
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer({"kind": "sentencepiece"})
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(str(f))


def test_missing_transformers_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match="pip install"):
        HFTokenizer(tmp_path)


def _build_hf_tokenizer(path: Path, with_eos: bool = True) -> Path:
    """A byte-level BPE (~300 ids) trained on a few sentences, saved as an HF directory."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world", "the quick brown fox", "héllo wörld"] * 20, trainer)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    if not with_eos:
        del specials["eos_token"]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _build_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def test_hf_round_trip_and_attributes(hf_dir):
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    # Byte-level BPE covers every byte, so any text (incl. unseen non-ASCII) round-trips.
    for text in TEXTS[1:]:
        ids = tok.encode(text)
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert ids.min() >= 0 and ids.max() < tok.vocab_size
        assert tok.decode(ids) == text
        assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id]])) == text
    # Merges learned from the training text make it shorter than its bytes.
    assert len(tok.encode("hello world")) < len(b"hello world")
    # Encoding adds no special tokens.
    assert tok.eos_id not in tok.encode("hello world").tolist()


def test_hf_spec_identifies_the_files(hf_dir, tmp_path):
    tok = load_tokenizer(str(hf_dir))
    spec = tok.spec()
    assert json.loads(json.dumps(spec)) == spec
    assert spec["kind"] == "hf" and spec["vocab_size"] == tok.vocab_size
    assert load_tokenizer(spec).spec() == spec
    # A copy elsewhere hashes the same; an edited tokenizer_config.json does not.
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    assert HFTokenizer(copy).spec()["files_sha256"] == spec["files_sha256"]
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "<s>"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    edited = HFTokenizer(copy)
    assert edited.pad_id == 0
    assert edited.spec()["files_sha256"] != spec["files_sha256"]


def test_hf_without_eos_is_refused(tmp_path):
    path = _build_hf_tokenizer(tmp_path / "no_eos", with_eos=False)
    with pytest.raises(ValueError, match="no EOS token"):
        HFTokenizer(path)
