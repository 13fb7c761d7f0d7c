"""Append-only record files: plain JSON Lines, or the compact form that a run keeps in the repository.

Contract:
- A path ending in `.gz` is *compact*: each appended line is its own gzip member (RFC 1952 allows a file of
  several), written and flushed at once, so an interrupted run loses at most the record being written, and
  `git add` of a file mid-run commits whole members plus at most one torn one. A reader ignores a torn last
  member, as it ignores a torn last line of a plain file; `truncate_torn` cuts it off before appending.
  Compact rollout records leave out what the repository must not hold or can rebuild: the question text
  (the problem is named by its file's sha256 and its row, DESIGN.md "Run artifacts") and the decoded text
  (the token ids are kept: the model's tokenizer rebuilds it).
- Any other path is plain JSON Lines, as before.
- `read_lines(path)` returns the complete lines, in order; `append(path, obj)` writes one.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

__all__ = ["COMPACT_DROPS", "append", "compact", "is_compact", "read_lines", "truncate_torn"]

COMPACT_DROPS = ("question", "text")  # rebuilt from the problem file (sha256 + row) and from the token ids


def is_compact(path: str | Path) -> bool:
    return str(path).endswith(".gz")


def compact(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a compact file stores it."""
    return {k: v for k, v in record.items() if k not in COMPACT_DROPS}


def _members(data: bytes) -> tuple[list[bytes], int]:
    """The decompressed complete gzip members of `data` and the byte length they span (a torn tail excluded)."""
    out, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(wbits=31)  # one gzip member
        try:
            chunk = d.decompress(data[pos:])
        except zlib.error:
            break  # a member torn inside its header or body
        if not d.eof:
            break  # a member cut short
        out.append(chunk)
        pos = len(data) - len(d.unused_data)
    return out, pos


def _text_and_end(path: Path) -> tuple[str, int]:
    """The file's text up to its last complete line (or member), and that point's byte offset."""
    data = path.read_bytes()
    if is_compact(path):
        members, end = _members(data)
        return b"".join(members).decode(), end
    end = data.rfind(b"\n") + 1
    return data[:end].decode(), end


def read_lines(path: str | Path) -> list[str]:
    """The complete lines of a record file (a torn last line or member is left out)."""
    text, _ = _text_and_end(Path(path))
    return [line for line in text.split("\n") if line.strip()]


def truncate_torn(path: str | Path) -> None:
    """Cut a torn last line or member, so that appending continues a well-formed file."""
    path = Path(path)
    _, end = _text_and_end(path)
    if end < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(end)


def append(f, obj: dict[str, Any], compact_form: bool) -> None:
    """Append one record to an open binary file and flush it."""
    line = (json.dumps(obj, separators=(",", ":") if compact_form else None) + "\n").encode()
    f.write(gzip.compress(line, mtime=0) if compact_form else line)
    f.flush()
