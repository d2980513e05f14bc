"""Token store: many tokenized documents as one flat memory-mapped array plus offsets.

The layout on disk is described in `longtrain.data.store_format`. Empty documents are skipped
at write time (counted in header["skipped_empty_docs"]), so every stored document has at least
one token and offsets are strictly increasing.

Writes are atomic: `TokenStoreWriter` fills a fresh `<dir>.tmp-XXXXXXXX` beside `<dir>`, writes
header.json last, then renames it to `<dir>`. A crash leaves at most a stray temporary
directory, never a store at `<dir>` that `TokenStore.open` would accept. Only a missing path,
an empty directory or one of our own stores is ever replaced (`check_replaceable`).
"""

from __future__ import annotations

import json
import os
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from longtrain.data.store_format import (
    BUILD_HINT,
    FORMAT,
    HEADER_FILE,
    MASK_FILE,
    OFFSETS_FILE,
    TOKENS_FILE,
    VERSION,
    check_header,
    check_max_id,
    check_replaceable,
    check_special_ids,
    fresh_dir,
    fsync_dir,
    read_header,
    remove_store_files,
    token_dtype,
)

_CHECK_CHUNK = 1 << 24  # tokens per read of the max-id scan in `open` (32 MiB of uint16)


class TokenStoreWriter:
    """Stream documents into a new token store at `path`; finalise atomically.

    Use as a context manager: a clean exit finalises (renames into place, replacing an old
    store at `path` if `check_replaceable` allows it), an exception aborts (removes the
    temporary directory)::

        with TokenStoreWriter(out, vocab_size=259, tokenizer_spec=tok.spec()) as w:
            for ids in docs:
                w.append(ids)  # or, in pieces: begin_document(); extend(...); end_document()
    """

    def __init__(
        self,
        path: str | Path,
        vocab_size: int,
        tokenizer_spec: dict[str, Any],
        fingerprint: str = "",
        meta: dict[str, Any] | None = None,
        loss_mask: bool = False,
    ) -> None:
        """Create a fresh `<path>.tmp-XXXXXXXX` directory beside `path` for writing.

        Args:
            path: final store directory (its parent is created if missing; a symbolic link is
                followed, so the store replaces the directory it points to).
            vocab_size: every appended id must be < vocab_size; also picks the on-disk dtype.
            tokenizer_spec: JSON-able tokenizer identity (`Tokenizer.spec()`), kept in the header;
                its eos_id, pad_id (and bos_id if not None) must be < vocab_size.
            fingerprint: identity of the inputs (see `longtrain.data.prepare`), kept in the header.
            meta: extra JSON-able facts to keep in header["meta"] (e.g. the source spec).
            loss_mask: write `loss_mask.bin` too: `extend(ids, mask)` says which tokens are
                training targets (a piece without a mask: all of them).
        Raises:
            DataError: `path` holds something that is not ours to replace (`check_replaceable`).
        """
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        check_special_ids(tokenizer_spec, self.vocab_size, f"store {str(self.path)!r}")
        self.tokenizer_spec = tokenizer_spec
        self.fingerprint = fingerprint
        self.meta = dict(meta or {})
        check_replaceable(self.path)
        self._target = Path(os.path.realpath(self.path))
        self._target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = fresh_dir(self._target.parent, f"{self._target.name}.tmp-")
        self._file = open(self.tmp_path / TOKENS_FILE, "wb")  # noqa: SIM115 (closed in finish)
        self._mask = open(self.tmp_path / MASK_FILE, "wb") if loss_mask else None  # noqa: SIM115
        self.trained_tokens = 0  # written tokens whose mask is 1 (closed documents)
        self._doc_trained = 0
        self._offsets = array("q", [0])
        self._doc_tokens: int | None = None  # tokens of the open document; None: none open
        self.skipped_empty_docs = 0
        self._done = False

    @property
    def num_docs(self) -> int:
        """Documents written so far (empty ones not counted)."""
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens written so far (including those of a document still open)."""
        return self._offsets[-1] + (self._doc_tokens or 0)

    @property
    def doc_tokens(self) -> int:
        """Tokens written into the open document so far (0 when none is open)."""
        return self._doc_tokens or 0

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"TokenStoreWriter for {str(self.path)!r} is already finished")

    def begin_document(self) -> None:
        """Start a document; fill it with `extend`, close it with `end_document`."""
        self._check_open()
        if self._doc_tokens is not None:
            raise ValueError("begin_document() while a document is open; call end_document()")
        self._doc_tokens = 0

    def extend(self, ids: Any, mask: Any = None) -> None:
        """Append a piece of the open document, cast straight to the store dtype.

        Args:
            ids: 1-D integer array-like [T] of token ids in 0..vocab_size-1.
            mask: with `loss_mask`, bool or 0/1 array-like [T], True where the token is a
                training target; None: all are.
        Raises:
            ValueError: a bad piece; the open document is then discarded (nothing of it stays).
        """
        self._check_open()
        if self._doc_tokens is None:
            raise ValueError("extend() without an open document; call begin_document() first")
        arr = np.asarray(ids)
        try:
            self._check_piece(arr)
            bits = self._mask_bits(arr, mask)
        except ValueError:
            self._discard_document()
            raise
        if arr.size:
            self._file.write(np.ascontiguousarray(arr.astype(self.dtype, copy=False)).data)
            if self._mask is not None:
                self._mask.write(bits.data)
                self._doc_trained += int(bits.sum())
            self._doc_tokens += arr.size

    @property
    def has_loss_mask(self) -> bool:
        """Whether this store gets a `loss_mask.bin`."""
        return self._mask is not None

    def enable_loss_mask(self) -> None:
        """Give the store a loss mask from now on (the first chat record of a source): every
        token written so far, of the open document too, is a training target."""
        self._check_open()
        if self._mask is not None:
            return
        self._mask = open(self.tmp_path / MASK_FILE, "wb")  # noqa: SIM115 (closed in finish)
        ones = np.ones(1 << 20, dtype=np.uint8)
        for lo in range(0, self.num_tokens, ones.size):
            self._mask.write(ones[: min(ones.size, self.num_tokens - lo)].data)
        self.trained_tokens = self._offsets[-1]
        self._doc_trained = self._doc_tokens or 0

    def _mask_bits(self, arr: np.ndarray, mask: Any) -> np.ndarray:
        if self._mask is None:
            if mask is not None:
                raise ValueError("a mask for a store written without loss_mask=True")
            return np.empty(0, dtype=np.uint8)
        if mask is None:
            return np.ones(arr.size, dtype=np.uint8)
        bits = np.asarray(mask)
        if bits.shape != arr.shape or not (
            bits.dtype == np.bool_
            or (np.issubdtype(bits.dtype, np.integer) and ((bits == 0) | (bits == 1)).all())
        ):
            raise ValueError(
                f"a loss mask must be bool or 0/1 of the piece's shape {arr.shape}, got "
                f"{bits.dtype} {bits.shape}"
            )
        return np.ascontiguousarray(bits.astype(np.uint8))

    def _check_piece(self, arr: np.ndarray) -> None:
        if arr.ndim != 1:
            raise ValueError(f"a document must be 1-D token ids, got shape {arr.shape}")
        if arr.size == 0:
            return
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"document {self.num_docs} holds token id {bad}, outside 0..{self.vocab_size - 1} "
                f"(vocab_size {self.vocab_size}); was it encoded with another tokenizer?"
            )

    def _discard_document(self) -> None:
        # Cut tokens.bin (and loss_mask.bin) back to where the open document began.
        self._file.flush()
        self._file.seek(self._offsets[-1] * self.dtype.itemsize)
        self._file.truncate()
        if self._mask is not None:
            self._mask.flush()
            self._mask.seek(self._offsets[-1])
            self._mask.truncate()
        self._doc_tokens, self._doc_trained = None, 0

    def end_document(self) -> int | None:
        """Close the open document.

        Returns:
            its index in the store, or None if it was empty (skipped, counted in the header).
        """
        self._check_open()
        if self._doc_tokens is None:
            raise ValueError("end_document() without an open document")
        n, self._doc_tokens = self._doc_tokens, None
        self.trained_tokens += self._doc_trained
        self._doc_trained = 0
        if n == 0:
            self.skipped_empty_docs += 1
            return None
        self._offsets.append(self._offsets[-1] + n)
        return self.num_docs - 1

    def append(self, ids: Any) -> int | None:
        """Append one whole document (checked before anything is written).

        Args:
            ids: 1-D integer array-like [T] of token ids in 0..vocab_size-1.
        Returns:
            the document's index in the store, or None if it was empty (skipped, counted).
        """
        self._check_open()
        arr = np.asarray(ids)
        self._check_piece(arr)
        self.begin_document()
        self.extend(arr)
        return self.end_document()

    def finish(self) -> Path:
        """Write offsets and header, fsync, and rename into place (replacing an old store).

        Returns:
            the final store path.
        Raises:
            ValueError: no non-empty document was appended (an empty store is refused), or a
                document is still open.
            DataError: `path` now holds something that is not ours to replace.
        """
        self._check_open()
        if self._doc_tokens is not None:
            self.abort()
            raise ValueError(f"finish() with a document still open in {str(self.path)!r}")
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
        for f in (self._file, self._mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
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
        if self._mask is not None:
            header["loss_mask"] = True
            header["trained_tokens"] = self.trained_tokens
        # The header is written last: a directory without it is never a complete store.
        with open(self.tmp_path / HEADER_FILE, "w") as f:
            json.dump(header, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.tmp_path)
        self._swap_into_place()

    def _swap_into_place(self) -> None:
        # Checked again here: the directory may have changed while we tokenized.
        check_replaceable(self._target)
        # os.replace cannot replace a non-empty directory: move the old one (a store, or an
        # empty directory) into a fresh directory first, and put it back if the second rename
        # fails, so `path` is never a broken store.
        target, aside = self._target, None
        if target.exists():
            aside = fresh_dir(target.parent, f"{target.name}.old-")
            os.replace(target, aside / target.name)
        try:
            os.replace(self.tmp_path, target)
        except BaseException:
            if aside is not None:
                os.replace(aside / target.name, target)
                aside.rmdir()
            raise
        fsync_dir(target.parent)
        if aside is not None:
            remove_store_files(aside / target.name)
            remove_store_files(aside)

    def abort(self) -> None:
        """Discard everything written; the final path is left as it was."""
        for f in (self._file, self._mask):
            if f is not None and not f.closed:
                f.close()
        if self.tmp_path.exists():
            remove_store_files(self.tmp_path)
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
        loss_mask: read-only np.memmap uint8 [num_tokens], 1 where the token is a training
            target, or None when the store has no mask (every token is one).
        offsets: int64 [num_docs + 1], offsets[0] = 0.
        doc_lengths: int64 [num_docs], every entry >= 1.
        num_docs, num_tokens, vocab_size: ints from the (validated) header.
    """

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        tokens: np.memmap,
        offsets: np.ndarray,
        loss_mask: np.memmap | None = None,
    ):
        """Use `TokenStore.open`; this only assigns already validated parts."""
        self.path = path
        self.header = header
        self.tokens = tokens
        self.loss_mask = loss_mask
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
                sequential read through a bounded buffer, so memory does not grow with the
                store; skipped when the dtype cannot hold an id >= vocab_size). The tokenizer's
                special ids are checked against vocab_size either way.
        Raises:
            FileNotFoundError: `path` does not exist.
            ValueError: the directory is not a complete, consistent store of this version.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no token store at {str(path)!r}; {BUILD_HINT}")
        header_file = path / HEADER_FILE
        if not header_file.is_file():
            raise ValueError(
                f"{str(path)!r} is not a complete token store (no {HEADER_FILE}): point at a "
                f"store, or {BUILD_HINT}"
            )
        try:
            header = json.loads(header_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(header_file)!r} is not valid JSON ({e}); rebuild") from e
        check_header(path, header)
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
        vocab_size = int(header["vocab_size"])
        # The header check made dtype the smallest that holds vocab_size ids, so when
        # vocab_size == iinfo.max + 1 no stored value can reach it and the scan is skipped.
        if check_tokens and vocab_size <= np.iinfo(dtype).max:
            check_max_id(tokens_file, dtype, offsets, vocab_size, _CHECK_CHUNK)
        tokens = np.memmap(tokens_file, dtype=dtype, mode="r", shape=(num_tokens,))
        return cls(path, header, tokens, offsets, _open_mask(path, header, num_tokens))


def _open_mask(path: Path, header: dict[str, Any], num_tokens: int) -> np.memmap | None:
    """The store's loss mask (see `store_format`), its size checked; None without one."""
    if not header.get("loss_mask"):
        return None
    file = path / MASK_FILE
    actual = file.stat().st_size if file.is_file() else -1
    if actual != num_tokens:
        raise ValueError(
            f"{str(file)!r} has {actual} bytes, expected {num_tokens} (one per token); the "
            "file is missing, truncated or corrupt: rebuild the store"
        )
    return np.memmap(file, dtype=np.uint8, mode="r", shape=(num_tokens,))


__all__ = [
    "FORMAT",
    "VERSION",
    "TokenStore",
    "TokenStoreWriter",
    "check_replaceable",
    "read_header",
    "token_dtype",
]
