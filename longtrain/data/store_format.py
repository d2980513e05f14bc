"""The on-disk format of a token store, and which directories a new store may replace.

A store is a directory:

    tokens.bin    all documents' token ids back to back, raw little-endian unsigned ints of
                  the smallest dtype that holds vocab_size ids (uint8 <= 256, uint16 <= 65536,
                  else uint32)
    offsets.npy   int64 [N+1]; document i is tokens[offsets[i]:offsets[i+1]]; offsets[0] = 0
    header.json   format, version, tokenizer spec, vocab_size, dtype, num_docs, num_tokens,
                  skipped_empty_docs, source fingerprint, created time, free-form meta;
                  `loss_mask: true` (with `trained_tokens`) when the next file is there
    loss_mask.bin optional (chat and prompt/completion data): uint8 [num_tokens], 1 where the
                  token is a training target (an assistant's or a completion's), else 0;
                  without it every token is one

A user's files are never deleted: a new store only replaces what `check_replaceable` allows (a
missing path, an empty directory, or a directory that holds our header and nothing but the
store's files), and files are removed by name (`remove_store_files`), never as a tree.
The reader and writer are in `longtrain.data.token_store`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from longtrain.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "longtrain.token_store"
VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
HEADER_FILE = "header.json"
MASK_FILE = "loss_mask.bin"
STORE_FILES = frozenset({TOKENS_FILE, OFFSETS_FILE, HEADER_FILE, MASK_FILE})
DTYPES = ("uint8", "uint16", "uint32")
BUILD_HINT = "build one with `python -m longtrain.data.prepare --source SOURCE --out NEW_DIR`"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1.

    Args:
        vocab_size: number of ids, >= 1.
    Returns:
        uint8 (<= 256), uint16 (<= 65536) or uint32 (<= 2**32).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for name in DTYPES:
        if vocab_size <= np.iinfo(name).max + 1:
            return np.dtype(name)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids (max 2**32)")


def read_header(path: str | Path) -> dict[str, Any] | None:
    """The header of the store at `path` if it carries our marker, else None.

    The marker is a header.json that parses as a JSON object whose "format" is FORMAT; nothing
    else is checked (a damaged store still has its marker). Never raises for a missing path.
    """
    try:
        header = json.loads((Path(path) / HEADER_FILE).read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return None
    return header if isinstance(header, dict) and header.get("format") == FORMAT else None


def check_replaceable(path: str | Path) -> None:
    """Raise DataError unless a new store may be written at `path`.

    Allowed: a missing path, an empty directory, or a directory that carries our store marker
    (see `read_header`) and holds nothing but the store's own files (tokens.bin, offsets.npy,
    header.json). Anything else belongs to the user and is never replaced.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise DataError(
            f"refusing to write a token store at {str(path)!r}: it is a file (or a broken "
            "link), not a directory; choose a new or empty directory for the store"
        )
    names = sorted(os.listdir(path))
    if not names:
        return
    extra = [n for n in names if n not in STORE_FILES or not (path / n).is_file()]
    if read_header(path) is None:
        shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
        raise DataError(
            f"refusing to write a token store into {str(path)!r}: it is a non-empty directory "
            f"that is not a token store (it holds {shown}); choose a new or empty directory"
        )
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (", ..." if len(extra) > 5 else "")
        raise DataError(
            f"refusing to replace the token store at {str(path)!r}: it also holds {shown}, "
            "which are not store files; move them out or choose another directory"
        )


def fresh_dir(parent: Path, prefix: str) -> Path:
    """Create and return a new directory `parent/<prefix><random hex>` that did not exist.

    Like tempfile.mkdtemp, but with the umask's permissions (mkdtemp's 0o700 would keep the
    store that this directory becomes unreadable to the rest of a team)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a fresh directory {prefix}* in {str(parent)!r}")


def remove_store_files(path: Path) -> None:
    """Delete the store files in `path`, then `path` itself if that left it empty.

    By name, never `rmtree`: whatever else sits there stays (with a warning)."""
    for name in STORE_FILES:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError as e:
        log.warning("left %s in place (%s): it holds files that are not a store's", path, e)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_special_ids(spec: Any, vocab_size: int, where: str) -> None:
    """Raise ValueError unless the spec's eos_id/pad_id (and bos_id if set) are in the vocab."""
    if not isinstance(spec, dict) or not all(
        isinstance(spec.get(k), int) for k in ("eos_id", "pad_id")
    ):
        raise ValueError(f"{where}: tokenizer spec {spec!r} lacks integer eos_id/pad_id")
    for key in ("eos_id", "pad_id", "bos_id"):
        value = spec.get(key)
        if value is not None and not (isinstance(value, int) and 0 <= value < vocab_size):
            raise ValueError(
                f"{where}: the tokenizer's {key} {value!r} is outside 0..{vocab_size - 1} "
                f"(vocab_size {vocab_size}); the header was edited or written for another "
                "tokenizer: rebuild the store"
            )


def check_header(path: Path, header: Any) -> None:
    """Raise ValueError unless `header` is a consistent header of this format version."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a token store ({HEADER_FILE} has no format {FORMAT!r}): "
            f"point at a store, or {BUILD_HINT}"
        )
    if header.get("version") != VERSION:
        raise ValueError(
            f"token store {str(path)!r} has format version {header.get('version')}, this "
            f"code reads version {VERSION}; rebuild it with `python -m longtrain.data.prepare`"
        )
    required = ("tokenizer", "vocab_size", "dtype", "num_docs", "num_tokens")
    missing = [k for k in required if k not in header]
    if missing:
        raise ValueError(f"header of {str(path)!r} lacks {missing}; rebuild the store")
    vocab_size = header["vocab_size"]
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"header of {str(path)!r}: vocab_size {vocab_size!r} is not >= 1")
    check_special_ids(header["tokenizer"], vocab_size, f"header of {str(path)!r}")
    if header["dtype"] not in DTYPES:
        raise ValueError(f"header of {str(path)!r} has unknown dtype {header['dtype']!r}")
    if np.dtype(header["dtype"]) != token_dtype(int(header["vocab_size"])):
        raise ValueError(
            f"header of {str(path)!r}: dtype {header['dtype']} does not match vocab_size "
            f"{header['vocab_size']}; rebuild the store"
        )


def check_max_id(
    file: Path, dtype: np.dtype, offsets: np.ndarray, vocab_size: int, chunk_tokens: int
) -> None:
    """Raise ValueError naming the first id >= vocab_size in `file` and its document.

    Reads through one reused buffer of `chunk_tokens` tokens rather than the memmap, whose
    touched pages would stay resident and grow the process by the whole store."""
    num_tokens = int(offsets[-1])
    buf = np.empty(min(chunk_tokens, num_tokens), dtype=dtype)
    with open(file, "rb") as f:
        for lo in range(0, num_tokens, buf.size):
            chunk = buf[: min(buf.size, num_tokens - lo)]
            got = f.readinto(chunk)
            if got != chunk.nbytes:
                raise ValueError(f"{str(file)!r} ended early (at token {lo}); rebuild the store")
            if chunk.max() >= vocab_size:
                pos = lo + int(np.argmax(chunk >= vocab_size))
                doc = int(np.searchsorted(offsets, pos, side="right")) - 1
                raise ValueError(
                    f"{str(file)!r}: token id {int(chunk[pos - lo])} at document {doc} "
                    f"(token {pos - int(offsets[doc])}) is >= vocab_size {vocab_size} of the "
                    "header; the store is corrupt or was written for another tokenizer: rebuild it"
                )
