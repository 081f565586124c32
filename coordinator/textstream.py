"""Incremental detokenization with stop strings.

Text is decoded so that multi-byte characters split across tokens come out whole, and released
only when it is final: never half a character, and never a tail that might still grow into a stop
string. Each token decodes only the tokens since the last settled point plus a few before them
(so that spaces and cleanups at the junction come out as in a whole decode): a long generation
costs linear, not quadratic, detokenization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

CONTEXT_TOKENS = 4  # decoded again before the new tokens, so that they join as in a whole decode
SETTLE_TOKENS = 16  # tokens decoded per push at most, beyond the context


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # text released so far
        self.stopped = False  # a stop string was found
        self._settled = 0  # token_ids[:_settled] decode to _settled_text, which no token changes
        self._settled_text = ""
        self._head = ""  # the decode of the context tokens just before _settled

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
        return self._release(self._decoded(), final)

    def _decoded(self) -> str:
        """The decode of every token so far, from the tokens since the settled point."""
        context = max(self._settled - CONTEXT_TOKENS, 0)
        window = self._decode(self.token_ids[context:])
        if not window.startswith(self._head):  # the junction decodes differently: decode it all
            full = self._decode(self.token_ids)
        else:
            full = self._settled_text + window[len(self._head) :]
        if len(self.token_ids) - self._settled >= SETTLE_TOKENS and not full.endswith("\ufffd"):
            self._settled, self._settled_text = len(self.token_ids), full
            self._head = self._decode(self.token_ids[max(self._settled - CONTEXT_TOKENS, 0) :])
        return full

    def _release(self, full: str, final: bool) -> str:
        if self.stopped:
            return ""
        # A stop string ends past the released text (it would have been found before otherwise).
        found = (full.find(s, max(len(self.text) - len(s), 0)) for s in self._stop)
        cut = min((i for i in found if i >= 0), default=-1)
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
