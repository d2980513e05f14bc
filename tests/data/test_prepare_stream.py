"""Big documents stream through `prepare` in pieces: the stored tokens are exactly those of the
whole-text recipe, and memory does not grow with the size of a document."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longtrain.data import sources
from longtrain.data.prepare import prepare
from longtrain.data.sources import directory_documents
from longtrain.data.token_store import TokenStoreWriter
from longtrain.data.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id
ROOT = Path(__file__).resolve().parents[2]

# A BOM, 2-, 3- and 4-byte characters, a stray byte, a 3-byte character cut short, an encoded
# surrogate (invalid in UTF-8) and a 4-byte character cut short at the end of the file.
TRICKY = (
    b"\xef\xbb\xbfa\xc3\xa9\xe6\x97\xa5\xf0\x9f\x99\x82\xff\xe6\x97x\xed\xa0\x80 end \xf0\x9f\x99"
)
FILES = {"a.txt": TRICKY, "b.txt": b"\xef\xbb", "c.txt": b"\xef\xbb\xbf", "d.txt": "ü".encode()}


def _old_recipe(data: bytes) -> list[int]:
    """What prepare stored before streaming: whole file -> str -> UTF-8 bytes, then EOS."""
    text = data.decode("utf-8-sig", errors="replace")
    return [*text.encode("utf-8", errors="replace"), EOS] if text else []


def test_pieces_equal_the_whole_text_at_every_cut(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, data in FILES.items():
        (docs / name).write_bytes(data)
    expected = [ids for data in FILES.values() if (ids := _old_recipe(data))]
    assert len(expected) == 3  # c.txt is only a BOM: an empty document, skipped
    for chunk in [*range(1, len(TRICKY) + 2), 1 << 20]:
        # Every cut position inside the multi-byte characters and the BOM is some piece's end.
        monkeypatch.setattr(sources, "_READ_CHUNK", chunk)
        store = prepare(f"dir:{docs}", tmp_path / "s", show_progress=False, force=True)
        assert [store.doc(i).tolist() for i in range(store.num_docs)] == expected, chunk
        texts = [t for _, t in directory_documents(docs)]
        whole = [d.decode("utf-8-sig", errors="replace") for d in FILES.values()]
        assert texts == [t for t in whole if t]


def test_hf_pieces_are_the_whole_text_encoded(tmp_path):
    from longtrain.data.tokenizer import load_tokenizer
    from tests.data.test_tokenizer import _build_hf_tokenizer

    tok = load_tokenizer(str(_build_hf_tokenizer(tmp_path / "tok")))
    pieces = ["the quick br", "own fox jum", "ps over"]
    out = list(tok.encode_chunks(iter(pieces), np.dtype("uint16")))
    assert len(out) == 1 and out[0].dtype == np.uint16
    assert out[0].tolist() == tok.encode("".join(pieces)).tolist()


def test_writer_takes_a_document_in_pieces(tmp_path):
    spec = ByteTokenizer().spec()
    with TokenStoreWriter(tmp_path / "s", 259, spec) as w:
        w.begin_document()
        w.extend(np.arange(5, dtype=np.int64))
        w.extend(np.array([7, 8], dtype=np.uint8))
        assert w.doc_tokens == 7
        assert w.end_document() == 0
        w.begin_document()
        w.extend([1, 2])
        with pytest.raises(ValueError, match="document 1 holds token id 300"):
            w.extend([300])  # the open document is discarded, nothing of it stays
        w.begin_document()
        assert w.end_document() is None  # empty: skipped and counted
        w.append([9])
    from longtrain.data.token_store import TokenStore

    store = TokenStore.open(tmp_path / "s")
    assert [store.doc(i).tolist() for i in range(2)] == [[0, 1, 2, 3, 4, 7, 8], [9]]
    assert store.header["skipped_empty_docs"] == 1


RSS_SCRIPT = """
import resource, sys
from pathlib import Path
from longtrain.data.prepare import prepare
root = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare(f"dir:{root / 'docs'}", root / "store", show_progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_one_big_document_prepares_in_bounded_memory(tmp_path):
    # Before: the whole file read, decoded, encoded to int64, concatenated with EOS and cast:
    # 1387 MiB of growth for this 64 MiB file (21.7x). Streamed: ~1 MiB pieces plus the
    # 32 MiB buffer of the max-id scan in TokenStore.open (measured 37 MiB).
    docs = tmp_path / "docs"
    docs.mkdir()
    line = ("plain words and a few naïve café 日本語 characters " * 4 + "\n").encode()
    block = line * 4096
    with open(docs / "big.txt", "wb") as f:
        for _ in range(64 * 2**20 // len(block) + 1):
            f.write(block)
    size = (docs / "big.txt").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = int(proc.stdout.split()[-1])
    mib = f"{growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
    assert growth < size, f"peak RSS grew by {mib}"
    assert (tmp_path / "store" / "tokens.bin").stat().st_size == 2 * (size + 1)  # uint16 + EOS
