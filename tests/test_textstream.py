"""Incremental detokenization: text is released only when final, stop strings cut it exactly."""

from __future__ import annotations

import random

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


def _whole_decode_releases(decode_fn, ids, stop):
    """What the stream released when it decoded every token each time (the reference)."""
    stream = TextStream(decode_fn, stop)
    stream._decoded = lambda: decode_fn(stream.token_ids)
    return [stream.push(i, final=n == len(ids) - 1) for n, i in enumerate(ids)], stream.stopped


def _sentencepiece_like(ids) -> str:
    # As SentencePiece's decoder: "▁" pieces become spaces and the text's leading space goes.
    return decode(ids).replace("_", " ").removeprefix(" ")


@pytest.mark.parametrize("decode_fn", [decode, _sentencepiece_like])
@pytest.mark.parametrize("seed", range(20))
def test_long_streams_release_what_a_whole_decode_releases(decode_fn, seed):
    """Hundreds of tokens (characters split across tokens, stop strings) give exactly the text
    of decoding every token every time, while each push decodes only a few tokens."""
    rng = random.Random(seed)
    ids = [rng.randrange(len(PIECES)) for _ in range(300)]
    ids = [i for n, i in enumerate(ids) if PIECES[i] != b"\xa9" or (n and ids[n - 1] == 5)]
    stop = rng.choice([[], ["END"], ["ld!"], ["xyz"]])
    decoded_lengths = []

    def counting(window):
        decoded_lengths.append(len(window))
        return decode_fn(window)

    stream = TextStream(counting, stop)
    released = [stream.push(i, final=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert (released, stream.stopped) == _whole_decode_releases(decode_fn, ids, stop)
    assert max(decoded_lengths) <= 32  # not the 300 a whole decode takes at the end
