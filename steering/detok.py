"""Incremental detokenization with stop strings, for streaming.

Contract: `TextStream.push(token_id)` returns the text that may be shown now; `finish()` returns what is
left. The concatenation of every returned piece equals `tokenizer.decode(ids, skip_special_tokens=True)`
cut before the first stop string (the stop string itself is never returned, even in part: text that
could be the start of a stop string is held back until it cannot be). `stopped` turns true as soon as a
stop string appears. Decoding is incremental (a small window of tokens per push), so a long completion
costs O(n), and a multi-byte character split across tokens is never emitted half-formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["TextStream"]


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are already in `text`
        self.text = ""  # detokenized so far (cut at a stop string once found)
        self._emitted = 0  # chars of `text` already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is safe to show now."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back (the end of the stream)."""
        if not self.stopped and self._read < len(self.ids):
            self.text += self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            start = max(0, self._emitted - self._holdback)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._holdback
        if end <= self._emitted:
            return ""
        piece, self._emitted = self.text[self._emitted:end], end
        return piece
