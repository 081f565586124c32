"""Incremental detokenization: text is released only when final, stop strings cut it exactly."""

from __future__ import annotations

import pytest

from coordinator.textstream import TextStream

# A byte-level toy vocabulary: token i decodes to PIECES[i] (bytes), so a character can span tokens.
PIECES = [b"Hel", b"lo", b" wor", b"ld", b"!", b"\xc3", b"\xa9", b"END", b"EN", b"D"]


def decode(ids) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    "ids, stop, released, stopped",
    [
        ([0, 1, 2, 3], [], ["Hel", "lo", " wor", "ld"], False),
        # A character split over two tokens is released whole, once complete.
        ([0, 5, 6, 4], [], ["Hel", "", "é", "!"], False),
        # A stop string inside one token: text up to it, nothing after.
        ([0, 1, 7, 2], ["END"], ["Hel", "lo", "", ""], True),
        # A stop string across tokens: its first part is held back until it is decided.
        ([0, 8, 9, 2], ["END"], ["Hel", "", "", ""], True),
        # A held-back prefix that turns out not to be a stop string is released.
        ([0, 8, 2], ["END"], ["Hel", "", "EN wor"], False),
    ],
)
def test_text_stream(ids, stop, released, stopped):
    stream = TextStream(decode, stop)
    assert [stream.push(i) for i in ids] == released
    assert stream.stopped == stopped


def test_final_token_releases_held_text():
    stream = TextStream(decode, ["END"])
    assert stream.push(0) == "Hel"
    assert stream.push(8, final=True) == "EN"  # the request ended: nothing more can complete it
    assert stream.text == "HelEN"
