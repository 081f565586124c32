"""Incremental detokenization with stop strings.

Text is decoded from all tokens so far (so multi-byte characters split across tokens come out whole)
and released only when it is final: never half a character, and never a tail that might still grow
into a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # text released so far
        self.stopped = False  # a stop string was found

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def push(self, token_id: int, final: bool = False) -> str:
        """Add a token; returns the newly released text. ``final``: no more tokens will come."""
        self.token_ids.append(token_id)
        return self._release(self._decode(self.token_ids), final)

    def _release(self, full: str, final: bool) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (full.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            ready = full[:cut]
        elif final:
            ready = full
        else:
            ready = full[: len(full) - self._held_back(full)]
            ready = ready.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next bytes
        if len(ready) <= len(self.text) or not ready.startswith(self.text):
            return ""
        delta = ready[len(self.text) :]
        self.text = ready
        return delta
