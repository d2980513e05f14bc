"""Token store: many tokenized documents as one flat memory-mapped array plus offsets.

On disk a store is a directory:

    tokens.bin    all documents' token ids back to back, raw little-endian unsigned ints of
                  the smallest dtype that holds vocab_size ids (uint8 <= 256, uint16 <= 65536,
                  else uint32)
    offsets.npy   int64 [N+1]; document i is tokens[offsets[i]:offsets[i+1]]; offsets[0] = 0
    header.json   format, version, tokenizer spec, vocab_size, dtype, num_docs, num_tokens,
                  skipped_empty_docs, source fingerprint, created time, free-form meta

Empty documents are skipped at write time (counted in header["skipped_empty_docs"]), so every
stored document has at least one token and offsets are strictly increasing.

Writes are atomic: `TokenStoreWriter` fills `<dir>.tmp-<pid>`, writes header.json last, then
renames it to `<dir>`. A crash leaves at most a stray `.tmp-<pid>` directory, never a store at
`<dir>` that `TokenStore.open` would accept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "longtrain.token_store"
VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
HEADER_FILE = "header.json"
_DTYPES = ("uint8", "uint16", "uint32")
_CHECK_CHUNK = 1 << 24  # tokens per chunk of the max-id scan in `open` (32 MiB of uint16)
_BUILD_HINT = "build it with `python -m longtrain.data.prepare --source stdlib --out DIR`"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1.

    Args:
        vocab_size: number of ids, >= 1.
    Returns:
        uint8 (<= 256), uint16 (<= 65536) or uint32 (<= 2**32).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for name in _DTYPES:
        if vocab_size <= np.iinfo(name).max + 1:
            return np.dtype(name)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids (max 2**32)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TokenStoreWriter:
    """Stream documents into a new token store at `path`; finalise atomically.

    Use as a context manager: a clean exit finalises (renames into place, replacing an old
    store at `path`), an exception aborts (removes the temporary directory)::

        with TokenStoreWriter(out, vocab_size=259, tokenizer_spec=tok.spec()) as w:
            for ids in docs:
                w.append(ids)
    """

    def __init__(
        self,
        path: str | Path,
        vocab_size: int,
        tokenizer_spec: dict[str, Any],
        fingerprint: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Open `<path>.tmp-<pid>` for writing.

        Args:
            path: final store directory (its parent is created if missing).
            vocab_size: every appended id must be < vocab_size; also picks the on-disk dtype.
            tokenizer_spec: JSON-able tokenizer identity (`Tokenizer.spec()`), kept in the header.
            fingerprint: identity of the inputs (see `longtrain.data.prepare`), kept in the header.
            meta: extra JSON-able facts to keep in header["meta"] (e.g. the source spec).
        """
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.tokenizer_spec = tokenizer_spec
        self.fingerprint = fingerprint
        self.meta = dict(meta or {})
        self.tmp_path = self.path.parent / f"{self.path.name}.tmp-{os.getpid()}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp_path.exists():  # left by an earlier crashed process with our pid
            shutil.rmtree(self.tmp_path)
        self.tmp_path.mkdir()
        self._file = open(self.tmp_path / TOKENS_FILE, "wb")  # noqa: SIM115 (closed in finish)
        self._offsets = array("q", [0])
        self.skipped_empty_docs = 0
        self._done = False

    @property
    def num_docs(self) -> int:
        """Documents written so far (empty ones not counted)."""
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens written so far."""
        return self._offsets[-1]

    def append(self, ids: Any) -> int | None:
        """Append one document.

        Args:
            ids: 1-D integer array-like [n] of token ids in 0..vocab_size-1.
        Returns:
            the document's index in the store, or None if it was empty (skipped, counted).
        """
        if self._done:
            raise ValueError(f"TokenStoreWriter for {str(self.path)!r} is already finished")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document must be 1-D token ids, got shape {arr.shape}")
        if arr.size == 0:
            self.skipped_empty_docs += 1
            return None
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"document {self.num_docs} holds token id {bad}, outside 0..{self.vocab_size - 1} "
                f"(vocab_size {self.vocab_size}); was it encoded with another tokenizer?"
            )
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)
        return self.num_docs - 1

    def finish(self) -> Path:
        """Write offsets and header, fsync, and rename into place (replacing an old store).

        Returns:
            the final store path.
        Raises:
            ValueError: no non-empty document was appended (an empty store is refused).
        """
        if self._done:
            raise ValueError(f"TokenStoreWriter for {str(self.path)!r} is already finished")
        if self.num_docs == 0:
            self.abort()
            raise ValueError(
                f"no non-empty documents were written to {str(self.path)!r} "
                f"({self.skipped_empty_docs} empty ones skipped); nothing to store"
            )
        try:
            self._finalise()
        except BaseException:
            self.abort()  # a failed finish leaves `path` as it was and no temporary directory
            raise
        self._done = True
        return self.path

    def _finalise(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        offsets = np.frombuffer(self._offsets, dtype=np.int64)
        with open(self.tmp_path / OFFSETS_FILE, "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        header = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": self.tokenizer_spec,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "skipped_empty_docs": self.skipped_empty_docs,
            "fingerprint": self.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "meta": self.meta,
        }
        # The header is written last: a directory without it is never a complete store.
        with open(self.tmp_path / HEADER_FILE, "w") as f:
            json.dump(header, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp_path)
        self._swap_into_place()

    def _swap_into_place(self) -> None:
        # os.replace cannot replace a non-empty directory: move the old store aside first,
        # and put it back if the second rename fails, so `path` is never a broken store.
        old = self.path.parent / f"{self.path.name}.old-{os.getpid()}"
        had_old = self.path.exists()
        if old.exists():  # left by an earlier crashed process with our pid
            shutil.rmtree(old)
        if had_old:
            os.replace(self.path, old)
        try:
            os.replace(self.tmp_path, self.path)
        except BaseException:
            if had_old:
                os.replace(old, self.path)
            raise
        _fsync_dir(self.path.parent)
        if had_old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written; the final path is left as it was."""
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        self._done = True

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._done:
                self.finish()
        elif not self._done:
            self.abort()


class TokenStore:
    """A read-only token store opened with `TokenStore.open(path)`.

    Attributes:
        path: the store directory.
        header: the parsed header.json.
        tokens: read-only np.memmap [num_tokens] of the on-disk dtype (header["dtype"]).
        offsets: int64 [num_docs + 1], offsets[0] = 0.
        doc_lengths: int64 [num_docs], every entry >= 1.
        num_docs, num_tokens, vocab_size: ints from the (validated) header.
    """

    def __init__(self, path: Path, header: dict[str, Any], tokens: np.memmap, offsets: np.ndarray):
        """Use `TokenStore.open`; this only assigns already validated parts."""
        self.path = path
        self.header = header
        self.tokens = tokens
        self.offsets = offsets
        self.doc_lengths = np.diff(offsets)
        self.num_docs = int(header["num_docs"])
        self.num_tokens = int(header["num_tokens"])
        self.vocab_size = int(header["vocab_size"])

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        """The tokenizer spec dict the store was written with (see `load_tokenizer`)."""
        return self.header["tokenizer"]

    @property
    def eos_id(self) -> int:
        """EOS id of the store's tokenizer (every document ends with it when built by prepare)."""
        return int(self.tokenizer_spec["eos_id"])

    @property
    def pad_id(self) -> int:
        """PAD id of the store's tokenizer (for filling packed sequences; never trained on)."""
        return int(self.tokenizer_spec["pad_id"])

    @property
    def bos_id(self) -> int | None:
        """BOS id of the store's tokenizer, or None if it has none."""
        bos = self.tokenizer_spec.get("bos_id")
        return None if bos is None else int(bos)

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document i (a view into the memmap, no copy).

        Args:
            i: document index, 0 <= i < num_docs.
        Returns:
            [doc_lengths[i]] array of the store dtype (read-only).
        """
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range 0..{self.num_docs - 1}")
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def slice(self, doc: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of document `doc` (a view, no copy).

        Args:
            doc: document index, 0 <= doc < num_docs.
            start: first token within the document, >= 0.
            length: number of tokens, >= 0, start + length <= doc_lengths[doc].
        Returns:
            [length] array of the store dtype (read-only).
        """
        if not 0 <= doc < self.num_docs:
            raise IndexError(f"document {doc} out of range 0..{self.num_docs - 1}")
        n = int(self.doc_lengths[doc])
        if start < 0 or length < 0 or start + length > n:
            raise IndexError(
                f"slice [{start}, {start + length}) is outside document {doc} of length {n}"
            )
        base = int(self.offsets[doc]) + start
        return np.asarray(self.tokens[base : base + length])

    @classmethod
    def open(cls, path: str | Path, check_tokens: bool = True) -> TokenStore:
        """Open and validate the store at `path`.

        Args:
            path: store directory.
            check_tokens: scan tokens.bin in chunks and check every id < vocab_size (one
                sequential read; skipped when the dtype cannot hold an id >= vocab_size).
        Raises:
            FileNotFoundError: `path` does not exist.
            ValueError: the directory is not a complete, consistent store of this version.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no token store at {str(path)!r}; {_BUILD_HINT}")
        header_file = path / HEADER_FILE
        if not header_file.is_file():
            raise ValueError(
                f"{str(path)!r} is not a complete token store (no {HEADER_FILE}); "
                f"delete it and rebuild: {_BUILD_HINT}"
            )
        try:
            header = json.loads(header_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(header_file)!r} is not valid JSON ({e}); rebuild") from e
        cls._check_header(path, header)
        dtype = np.dtype(header["dtype"])
        num_docs, num_tokens = int(header["num_docs"]), int(header["num_tokens"])

        offsets_file = path / OFFSETS_FILE
        try:
            offsets = np.load(offsets_file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read offsets {str(offsets_file)!r}: {e}; rebuild") from e
        if offsets.dtype != np.int64 or offsets.shape != (num_docs + 1,):
            raise ValueError(
                f"{str(offsets_file)!r} has dtype {offsets.dtype} shape {offsets.shape}, "
                f"expected int64 ({num_docs + 1},) for num_docs {num_docs}; rebuild the store"
            )
        if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) <= 0):
            raise ValueError(
                f"{str(offsets_file)!r} is inconsistent: offsets must rise strictly from 0 to "
                f"num_tokens {num_tokens} (first {offsets[0]}, last {offsets[-1]}); rebuild"
            )

        tokens_file = path / TOKENS_FILE
        expected = num_tokens * dtype.itemsize
        actual = tokens_file.stat().st_size if tokens_file.is_file() else -1
        if actual != expected:
            raise ValueError(
                f"{str(tokens_file)!r} has {actual} bytes, expected {expected} "
                f"({num_tokens} tokens of {dtype.name}); the file is truncated or "
                "corrupt: rebuild the store"
            )
        tokens = np.memmap(tokens_file, dtype=dtype, mode="r", shape=(num_tokens,))
        vocab_size = int(header["vocab_size"])
        if check_tokens and vocab_size <= np.iinfo(dtype).max:
            _check_max_id(tokens, offsets, vocab_size, tokens_file)
        return cls(path, header, tokens, offsets)

    @staticmethod
    def _check_header(path: Path, header: Any) -> None:
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} has no {FORMAT} header; rebuild: {_BUILD_HINT}")
        if header.get("version") != VERSION:
            raise ValueError(
                f"token store {str(path)!r} has format version {header.get('version')}, this "
                f"code reads version {VERSION}; rebuild it with `python -m longtrain.data.prepare`"
            )
        required = ("tokenizer", "vocab_size", "dtype", "num_docs", "num_tokens")
        missing = [k for k in required if k not in header]
        if missing:
            raise ValueError(f"header of {str(path)!r} lacks {missing}; rebuild the store")
        tok = header["tokenizer"]
        if not isinstance(tok, dict) or not all(
            isinstance(tok.get(k), int) for k in ("eos_id", "pad_id")
        ):
            raise ValueError(
                f"header of {str(path)!r}: tokenizer spec {tok!r} lacks integer eos_id/pad_id"
            )
        if header["dtype"] not in _DTYPES:
            raise ValueError(f"header of {str(path)!r} has unknown dtype {header['dtype']!r}")
        if np.dtype(header["dtype"]) != token_dtype(int(header["vocab_size"])):
            raise ValueError(
                f"header of {str(path)!r}: dtype {header['dtype']} does not match vocab_size "
                f"{header['vocab_size']}; rebuild the store"
            )


def _check_max_id(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int, file: Path) -> None:
    """Raise ValueError naming the first id >= vocab_size and its document."""
    for lo in range(0, tokens.shape[0], _CHECK_CHUNK):
        chunk = tokens[lo : lo + _CHECK_CHUNK]
        if chunk.max() >= vocab_size:
            pos = lo + int(np.argmax(chunk >= vocab_size))
            doc = int(np.searchsorted(offsets, pos, side="right")) - 1
            raise ValueError(
                f"{str(file)!r}: token id {int(tokens[pos])} at document {doc} "
                f"(token {pos - int(offsets[doc])}) is >= vocab_size {vocab_size}; "
                "the store is corrupt or was written for another tokenizer: rebuild it"
            )
