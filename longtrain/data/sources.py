"""Document sources: deterministic iterators of (name, text), one document each.

- `stdlib_documents()`: the Python standard library's own `.py` files (real, offline text with
  a heavy-tailed length distribution), each file one document.
- `directory_documents(path, pattern)`: every file matching a glob under a directory.
- `jsonl_documents(path, field)`: one document per JSON line (a file or a directory of them).

`open_source("stdlib" | "dir:PATH" | "jsonl:PATH")` parses a source spec into a `Source`, which
also lists the files it reads (`file_stats()`), so a caller can fingerprint its inputs, and
says what it is (`identity()`, `location`), so a store can tell which source built it.
`Source.document_chunks()` gives each document as consecutive text pieces (a big text file is
read and decoded about 1 MiB at a time); `Source.documents()` joins them.

Files are visited in sorted order of their path relative to the root, so the documents come
out in the same order on every machine. Empty documents are skipped; a source that yields no
document at all raises ValueError. Missing paths raise FileNotFoundError at call time, not at
first iteration.
"""

from __future__ import annotations

import codecs
import io
import itertools
import json
import logging
import os
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtrain.errors import DataError

log = logging.getLogger(__name__)

_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_READ_CHUNK = 1 << 20  # bytes of a text file read and decoded at a time


def _check_limit(limit: int | None) -> int | None:
    if limit is None or limit == 0:
        return None
    if limit < 0:
        raise ValueError(f"limit must be None, 0 (all documents) or positive, got {limit}")
    return limit


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library (sysconfig "stdlib")."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """All `.py` files of the standard library, sorted by relative path; site-packages,
    dist-packages and __pycache__ are left out."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {str(root)!r} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: _rel(p, root))


def _read_python(path: Path) -> str | None:
    """Source text of a .py file decoded per PEP 263 (coding cookie / BOM); None if unreadable."""
    try:
        data = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (OSError, SyntaxError, LookupError, UnicodeDecodeError) as e:
        # The stdlib's test suite holds a few deliberately mis-encoded files.
        log.debug("skipping unreadable %s: %s", path, e)
        return None


def _python_chunks(path: Path) -> Iterator[str]:
    """A .py file's text as one piece (none if unreadable or empty); see `_read_python`."""
    text = _read_python(path)
    if text:
        yield text


def _text_chunks(path: Path) -> Iterator[str]:
    """UTF-8 text of a file in non-empty pieces of about _READ_CHUNK bytes.

    A BOM is dropped and invalid bytes become U+FFFD, as `path.read_bytes().decode("utf-8-sig",
    errors="replace")` would do: the incremental decoder holds back a character cut at a
    piece's end until the next piece completes it, so the joined pieces equal that text.
    The BOM is stripped here, not by the "utf-8-sig" incremental decoder, which drops a file
    that is a cut-short BOM (b"\\xef\\xbb") instead of decoding it to U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as f:
        block = f.read(max(_READ_CHUNK, len(codecs.BOM_UTF8)))
        if block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8) :]
        while True:  # the first block may be empty after the BOM with more to come
            if text := decoder.decode(block):
                yield text
            if not (block := f.read(_READ_CHUNK)):
                break
    if tail := decoder.decode(b"", final=True):
        yield tail


def _files_documents(
    files: tuple[Path, ...],
    root: Path,
    read: Callable[[Path], Iterator[str]],
    limit: int | None,
    what: str,
) -> Iterator[tuple[str, Iterator[str]]]:
    n = 0
    for path in files:
        if limit is not None and n >= limit:
            return
        chunks = read(path)
        first = next(chunks, None)  # pieces are never empty: None means an empty document
        if first is not None:
            n += 1
            yield _rel(path, root), itertools.chain((first,), chunks)
    if n == 0:
        raise ValueError(f"no documents found in {what}: every file was empty or unreadable")


def stdlib_source() -> Source:
    """The standard library's `.py` files as a `Source` (see `stdlib_documents`)."""
    root = stdlib_root()
    files = stdlib_files()
    if not files:
        raise ValueError(f"no .py files found under the standard library {str(root)!r}")
    return Source("stdlib", "stdlib", root, tuple(files))


def directory_source(path: str | Path, pattern: str = "**/*.txt") -> Source:
    """Files matching `pattern` under directory `path` as a `Source`."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"document directory {str(root)!r} does not exist")
    files = _glob_files(root, pattern)
    if not files:
        raise ValueError(f"no files match {pattern!r} under {str(root)!r}; is it the right path?")
    return Source(f"dir:{path}", "dir", root, tuple(files), pattern=pattern)


def jsonl_source(path: str | Path, field: str = "text") -> Source:
    """A .jsonl file, or every `**/*.jsonl` under a directory, as a `Source`."""
    p = Path(path)
    if p.is_file():
        return Source(f"jsonl:{path}", "jsonl", p.parent, (p,), field=field)
    if not p.is_dir():
        raise FileNotFoundError(f"JSONL path {str(p)!r} does not exist (file or directory)")
    files = _glob_files(p, "**/*.jsonl")
    if not files:
        raise ValueError(f"no .jsonl files under {str(p)!r}; is it the right path?")
    return Source(f"jsonl:{path}", "jsonl", p, tuple(files), field=field)


def stdlib_documents(limit: int | None = None) -> Iterator[tuple[str, str]]:
    """The standard library's `.py` files as documents, one per file.

    Args:
        limit: None or 0 for all, else stop after this many documents.
    Returns:
        iterator of (path relative to the stdlib root, source text decoded per its coding
        cookie); unreadable and empty files are skipped.
    """
    return stdlib_source().documents(limit)


def directory_documents(
    path: str | Path, pattern: str = "**/*.txt", limit: int | None = None
) -> Iterator[tuple[str, str]]:
    """Every file matching `pattern` under `path`, one document each.

    Args:
        path: an existing directory.
        pattern: glob relative to `path` ("**/*.txt" also matches files directly in `path`).
        limit: None or 0 for all, else stop after this many documents.
    Returns:
        iterator of (path relative to `path`, UTF-8 text with invalid bytes as U+FFFD);
        empty files are skipped.
    """
    return directory_source(path, pattern).documents(limit)


def jsonl_documents(
    path: str | Path, field: str = "text", limit: int | None = None
) -> Iterator[tuple[str, str]]:
    """One document per JSON line.

    Args:
        path: a .jsonl file, or a directory searched recursively for *.jsonl.
        field: the key holding the text in each JSON object.
        limit: None or 0 for all, else stop after this many documents.
    Returns:
        iterator of ("file:line", text); blank lines and empty texts are skipped. A line that
        is not JSON, lacks `field`, or holds a non-string raises ValueError naming file and line.
    """
    return jsonl_source(path, field).documents(limit)


def _glob_files(path: Path, pattern: str) -> list[Path]:
    return sorted((p for p in path.glob(pattern) if p.is_file()), key=lambda p: _rel(p, path))


def _jsonl_objects(
    files: tuple[Path, ...], root: Path, limit: int | None, parse
) -> Iterator[tuple[str, str, Any]]:
    """(name "file:line", where "'path' line N", parse(JSON value, where)) of every non-blank
    line, in order; a line that `parse` makes None is skipped and not counted (for `limit`)."""
    n = 0
    for file in files:
        # Bytes, decoded line by line, so that a line that is not UTF-8 is named.
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if limit is not None and n >= limit:
                    return
                where = f"{str(file)!r} line {lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{where} is not valid UTF-8 (byte {e.start + 1} of the line: "
                        f"{e.reason}); re-encode the file as UTF-8"
                    ) from e
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} is not valid JSON: {e}") from e
                parsed = parse(obj, where)
                if parsed is not None:
                    n += 1
                    yield f"{_rel(file, root)}:{lineno}", where, parsed
    if n == 0:
        raise ValueError(f"no documents found in JSONL {[str(f) for f in files]}")


def _jsonl_lines(
    files: tuple[Path, ...], root: Path, field: str, limit: int | None
) -> Iterator[tuple[str, str]]:
    def text_of(obj: Any, where: str) -> str | None:
        if not isinstance(obj, dict) or field not in obj:
            raise ValueError(
                f"{where} has no field {field!r}; pass the name of the text field "
                "(jsonl_documents(path, field=...))"
            )
        if not isinstance(obj[field], str):
            raise ValueError(
                f"{where}: field {field!r} is {type(obj[field]).__name__}, expected a string"
            )
        return obj[field] or None

    for name, _, text in _jsonl_objects(files, root, limit, text_of):
        yield name, text


@dataclass(frozen=True)
class Source:
    """A parsed source: which files it reads (`files`) and how (`documents`)."""

    spec: str  # "stdlib" | "dir:PATH" | "jsonl:PATH"
    kind: str  # "stdlib" | "dir" | "jsonl"
    root: Path  # document names are paths relative to it
    files: tuple[Path, ...]  # sorted by relative path
    pattern: str = "**/*.txt"  # kind "dir": the glob that found `files`
    field: str = "text"  # kind "jsonl": the key holding the text

    def documents(self, limit: int | None = None) -> Iterator[tuple[str, str]]:
        """(name, text) documents; limit None or 0 for all, else stop after that many."""
        return ((name, "".join(chunks)) for name, chunks in self.document_chunks(limit))

    def records(self, limit: int | None = None) -> Iterator[tuple[str, str, Any]]:
        """(name, where, Record) of a JSONL source's lines (`longtrain.data.chat`): text,
        chat messages, or prompt/completion; limit None or 0 for all, else stop after that
        many records (empty texts are skipped and not counted). A bad record raises
        DataError naming its file and line."""
        from longtrain.data.chat import parse_record

        if self.kind != "jsonl":
            raise ValueError(f"records() reads JSONL sources, not {self.kind!r}")

        def parse(obj: Any, where: str):
            return parse_record(obj, where, self.field)

        return _jsonl_objects(self.files, self.root, _check_limit(limit), parse)

    def document_chunks(self, limit: int | None = None) -> Iterator[tuple[str, Iterator[str]]]:
        """(name, pieces) documents: each text as consecutive non-empty str pieces.

        Args:
            limit: None or 0 for all, else stop after that many (non-empty) documents.
        Returns:
            iterator of (name, iterator of str); consume a document's pieces before asking for
            the next document. A text file comes in pieces of about 1 MiB; a stdlib file or a
            JSONL line comes whole. Joined, the pieces equal the `documents()` text.
        """
        limit = _check_limit(limit)
        if self.kind == "jsonl":
            lines = _jsonl_lines(self.files, self.root, self.field, limit)
            return ((name, iter((text,))) for name, text in lines)
        read = _python_chunks if self.kind == "stdlib" else _text_chunks
        what = f"{self.spec!r} ({len(self.files)} files)"
        return _files_documents(self.files, self.root, read, limit, what)

    @property
    def location(self) -> Path:
        """The path the spec names (the stdlib root, the text directory, the .jsonl file or
        directory), resolved: the place a token store must not overlap."""
        if self.kind == "stdlib":
            return self.root.resolve()
        return Path(self.spec.partition(":")[2]).resolve()

    def identity(self) -> dict[str, Any]:
        """Which source this is, independent of its content: see `source_identity`."""
        return source_identity(self.spec)

    def file_stats(self) -> list[tuple[str, int, int]]:
        """[(path relative to root, size in bytes, mtime in ns)] of every input file."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append((_rel(f, self.root), st.st_size, st.st_mtime_ns))
        return out


def source_identity(spec: str) -> dict[str, Any]:
    """What a source spec names, without reading it: {"kind"} for stdlib (whichever Python's),
    else {"kind", "path"} with the path resolved against the current directory.

    Two specs with the same identity are the same source (its files may have changed); a token
    store keeps its source's identity in header["meta"]["source_id"].
    """
    if spec == "stdlib":
        return {"kind": "stdlib"}
    kind, _, path = spec.partition(":")
    return {"kind": kind, "path": str(Path(path).resolve())}


def open_source(spec: str) -> Source:
    """Parse a source spec and list its files.

    Args:
        spec: "stdlib", "dir:PATH" (every **/*.txt under PATH) or "jsonl:PATH" (a .jsonl file
            or a directory of them; the text is in field "text").
    Raises:
        ValueError: unknown spec, or no input files. FileNotFoundError: PATH does not exist.
    """
    if spec == "stdlib":
        return stdlib_source()
    kind, sep, path = spec.partition(":")
    if sep and path and kind == "dir":
        return directory_source(path)
    if sep and path and kind == "jsonl":
        return jsonl_source(path)
    raise ValueError(f"unknown source {spec!r}; expected 'stdlib', 'dir:PATH' or 'jsonl:PATH'")
