"""Tokenizers: a byte-level one with no files, and a wrapper for local Hugging Face tokenizers.

Both expose the same small surface (the `Tokenizer` protocol): `name`, `vocab_size`, `bos_id`,
`eos_id`, `pad_id`, `encode(text) -> int64 [T]`, `encode_chunks(text pieces, dtype)` (a document
given in pieces, encoded into arrays of the store's dtype: what `prepare` streams through),
`decode(ids) -> str` and `spec()`, a JSON-able
dict that identifies the tokenizer (stored in a token store's header and used in its
fingerprint, so that a different tokenizer means a different store).

`load_tokenizer("byte")` or `load_tokenizer("/path/to/hf_tokenizer_dir")` picks one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from longtrain.errors import DataError

# Files of a Hugging Face tokenizer directory that define its behaviour. Hashed into `spec()`;
# model weights that may sit in the same directory are deliberately left out.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_chunks(self, chunks: Iterable[str], dtype: np.dtype) -> Iterator[np.ndarray]: ...

    def decode(self, ids: Any) -> str: ...

    def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, BOS=256, EOS=257, PAD=258 (vocab 259).

    Needs no files and never sees an unknown token, so any text round-trips exactly
    (lone surrogates, which UTF-8 cannot encode, become '?').
    """

    name = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> np.ndarray:
        """Encode text as its UTF-8 bytes.

        Args:
            text: any str.
        Returns:
            int64 [T], T = number of UTF-8 bytes, each id in 0..255; no BOS/EOS added.
        """
        data = text.encode("utf-8", errors="replace")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def encode_chunks(self, chunks: Iterable[str], dtype: np.dtype) -> Iterator[np.ndarray]:
        """Encode a document given in pieces, piece by piece (memory: one piece at a time).

        Exact: UTF-8 encodes each character on its own, so the concatenated output equals
        `encode("".join(chunks))` (a str piece never splits a character).

        Args:
            chunks: the document's text in consecutive pieces.
            dtype: the integer dtype of the output arrays (the token store's).
        Returns:
            iterator of [n_i] arrays of `dtype`, ids in 0..255, one per non-empty piece.
        """
        for text in chunks:
            data = text.encode("utf-8", errors="replace")
            if data:
                yield np.frombuffer(data, dtype=np.uint8).astype(dtype)

    def decode(self, ids: Any) -> str:
        """Decode ids back to text; special ids (256..258) are skipped.

        Args:
            ids: 1-D sequence/array of integer ids in 0..258.
        Returns:
            str; invalid UTF-8 byte sequences (e.g. a slice cut mid-character) become U+FFFD.
        """
        arr = np.asarray(ids).reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ByteTokenizer.decode needs integer ids, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(
                f"token id {int(bad)} is outside the byte vocabulary 0..{self.vocab_size - 1}; "
                "were these ids made by another tokenizer?"
            )
        data = arr[arr < 256].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        """JSON-able identity: {"kind": "byte", "vocab_size": 259, ...special ids}."""
        return {
            "kind": "byte",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def _import_auto_tokenizer() -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(
            "a Hugging Face tokenizer directory needs the `transformers` package: "
            "pip install 'longtrain[hf]' (or pip install transformers), or use tokenizer='byte'"
        ) from e
    return AutoTokenizer


def _hash_tokenizer_files(path: Path) -> str:
    """sha256 over the names and contents of the tokenizer-defining files in `path`."""
    h = hashlib.sha256()
    for fname in _HF_TOKENIZER_FILES:
        f = path / fname
        if f.is_file():
            h.update(fname.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class HFTokenizer:
    """A local Hugging Face tokenizer directory (never downloads: local_files_only=True).

    `vocab_size` counts added tokens too (len(tokenizer)), so every id that `encode` can
    produce is < vocab_size. `pad_id` falls back to `eos_id` when the tokenizer has no pad
    token (padding is never trained on). A tokenizer without an EOS token is refused, because
    every stored document ends with EOS.
    """

    def __init__(self, path: str | Path) -> None:
        """Load the tokenizer in directory `path` (FileNotFoundError if it does not exist)."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer directory {str(path)!r} does not exist; pass tokenizer='byte' or "
                "the path of a local Hugging Face tokenizer directory (with tokenizer.json)"
            )
        if not path.is_dir():
            raise ValueError(
                f"tokenizer path {str(path)!r} is a file; pass the directory that holds it "
                "(tokenizer.json, tokenizer_config.json, ...)"
            )
        self.path = path.resolve()
        auto = _import_auto_tokenizer()
        try:
            self._tok = auto.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"could not load a Hugging Face tokenizer from {str(self.path)!r}: {e}"
            ) from e
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"tokenizer at {str(self.path)!r} has no EOS token, but every stored document "
                "ends with EOS; set eos_token in its tokenizer_config.json"
            )
        self.name = f"hf:{self.path.name}"
        self.vocab_size = int(len(self._tok))
        self.bos_id = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        self.eos_id = int(self._tok.eos_token_id)
        pad = self._tok.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        # The Rust backend encodes ~2x faster than the Python wrapper and never warns about
        # documents longer than model_max_length (whole files are documents here).
        self._backend = getattr(self._tok, "backend_tokenizer", None)
        self._files_sha256 = _hash_tokenizer_files(self.path)

    def encode(self, text: str) -> np.ndarray:
        """Encode text without special tokens.

        Args:
            text: any str.
        Returns:
            int64 [T], ids in 0..vocab_size-1; no BOS/EOS added.
        """
        return np.asarray(self._ids(text), dtype=np.int64)

    def _ids(self, text: str) -> list[int]:
        """The ids of `text` as the tokenizer's own list (no special tokens)."""
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, add_special_tokens=False)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        """The token ids of `messages` rendered by the tokenizer's chat template (its own
        special tokens included). Raises DataError when the tokenizer has none."""
        if not getattr(self._tok, "chat_template", None):
            raise DataError(
                f"tokenizer {self.name} has no chat_template, which 'messages' records need; "
                "use a tokenizer with one (tokenizer_config.json), or prompt/completion records"
            )
        ids = self._tok.apply_chat_template(
            list(messages),
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
        )
        return [int(i) for i in ids]

    def encode_chunks(self, chunks: Iterable[str], dtype: np.dtype) -> Iterator[np.ndarray]:
        """Encode a document given in pieces, as one text.

        Subword merges cross any place the text could be cut, so encoding piece by piece would
        tokenize differently at the cuts: the pieces are joined and encoded whole. The ids go
        straight from the tokenizer's list into `dtype` (no int64 array in between).

        Args:
            chunks: the document's text in consecutive pieces.
            dtype: the integer dtype of the output (the token store's; holds vocab_size ids).
        Returns:
            iterator of one [T] array of `dtype` (none for an empty text).
        """
        ids = self._ids("".join(chunks))
        if ids:
            yield np.asarray(ids, dtype=dtype)

    def decode(self, ids: Any) -> str:
        """Decode ids to text, skipping special tokens.

        Args:
            ids: 1-D sequence/array of integer ids in 0..vocab_size-1.
        Returns:
            str.
        """
        arr = np.asarray(ids).reshape(-1)
        return self._tok.decode(arr.tolist(), skip_special_tokens=True)

    def spec(self) -> dict[str, Any]:
        """JSON-able identity: kind "hf", resolved path, vocab/special ids and a sha256 of
        the tokenizer files (so an edited tokenizer in the same directory is a new spec)."""
        return {
            "kind": "hf",
            "name": self.name,
            "path": str(self.path),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "files_sha256": self._files_sha256,
        }

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | Path | dict[str, Any]) -> ByteTokenizer | HFTokenizer:
    """Build a tokenizer from a spec.

    Args:
        spec: "byte"; a path to a local Hugging Face tokenizer directory; or a dict returned
            by `Tokenizer.spec()` (e.g. from a token store header: kind "byte" or "hf").
    Returns:
        ByteTokenizer or HFTokenizer.
    Raises:
        FileNotFoundError: the directory does not exist.
        ImportError: a directory was given but `transformers` is not installed.
        ValueError: an unknown spec dict kind, or a directory that holds no usable tokenizer.
    """
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "hf" and "path" in spec:
            return HFTokenizer(spec["path"])
        raise ValueError(
            f"unknown tokenizer spec {spec!r}; expected kind 'byte' or kind 'hf' with a 'path'"
        )
    if str(spec) == "byte":
        return ByteTokenizer()
    if str(spec) == "":
        raise ValueError("empty tokenizer spec; pass 'byte' or a tokenizer directory path")
    return HFTokenizer(spec)
