"""What a stage boundary costs without any network: in one process, decode through one stage
holding every layer, through two stages chained lazily (no boundary at all), and through two
stages with the boundary a real stage has (evaluate, copy to host bytes, copy back), all with
Pomona's own StageModel on the same weights. And what idling costs: a stage of an N-stage ring
idles while the other N-1 compute, so rows "idle Kx" decode through one stage that sleeps K times
each token's compute after it (as a stage of K+1 does), counting the compute only: whatever they
lose over "1 stage" is the machine computing slower after a sleep, not Pomona. Rows "busy Kx"
wait as long but spin instead of sleeping: if they lose nothing, the loss is the idleness
itself (a core that sleeps wakes slower), not the time that passed.

    .venv/bin/python bench/boundary_bench.py [--models smollm2,tiny] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import make_tiny_checkpoint  # noqa: E402

from pomona.fetch import fetch_default_model  # noqa: E402
from worker.stage import load_stage  # noqa: E402
from worker.wire import decode_tensor, encode_tensor  # noqa: E402

REPEATS = 5
PROMPT_TOKENS = 64


def decode_s(stages, boundary: str, new_tokens: int, idle: float = 0.0, spin: bool = False) -> float:
    """Seconds per decoded token (greedy) through ``stages`` joined by ``boundary``; with
    ``idle``, a wait of ``idle`` times each token's compute after it, not counted: a sleep, or
    with ``spin`` a busy loop."""
    caches = [stage.new_caches() for stage in stages]

    def step(inputs):
        hidden = inputs
        for index, (stage, cache) in enumerate(zip(stages, caches)):
            if index and boundary == "host":
                hidden = decode_tensor(encode_tensor(hidden))  # evaluate, to bytes, back
            hidden = stage.forward(hidden, cache)
        return mx.argmax(stages[-1].logits(hidden)).item()

    token = step(mx.array([list(range(1, PROMPT_TOKENS + 1))], dtype=mx.int32))
    computing = 0.0
    for _ in range(new_tokens):
        started = time.perf_counter()
        token = step(mx.array([[token]], dtype=mx.int32))
        elapsed = time.perf_counter() - started
        computing += elapsed
        if idle and spin:
            until = time.perf_counter() + idle * elapsed
            while time.perf_counter() < until:
                pass
        elif idle:
            time.sleep(idle * elapsed)
    return computing / new_tokens


def bench(name: str, path, layers: int, new_tokens: int) -> None:
    middle = layers // 2
    whole = [load_stage(path, 0, layers, True, True)]
    halves = [load_stage(path, 0, middle, True, False), load_stage(path, middle, layers, False, True)]
    setups = {"1 stage": (whole, "none"), "2 stages, lazy join": (halves, "none"),
              "2 stages, host boundary": (halves, "host"),
              "1 stage, idle 1x": (whole, "none", 1.0), "1 stage, idle 2x": (whole, "none", 2.0),
              "1 stage, busy 2x": (whole, "none", 2.0, True)}  # fmt: skip
    best = {key: float("inf") for key in setups}
    for _ in range(REPEATS):  # interleaved rounds, best of each: this machine drifts
        for key, (stages, boundary, *wait) in setups.items():
            best[key] = min(best[key], decode_s(stages, boundary, new_tokens, *wait))
    base = best["1 stage"]
    print(f"\n== {name}: {layers} layers, split at {middle}; {new_tokens} tokens, best of {REPEATS} ==")
    for key, seconds in best.items():
        print(f"{key:<26}{seconds * 1e3:>9.2f} ms/token{(seconds - base) * 1e3:>+9.2f} ms"
              f"{base / seconds:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,tiny")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pomona-boundary-") as tmp:
        for name in args.models.split(","):
            if name == "smollm2":
                bench(name, fetch_default_model(True), 30, args.new_tokens)
            elif name == "tiny":
                path = make_tiny_checkpoint("llama", Path(tmp) / "tiny")
                bench(name, path, 6, args.new_tokens * 8)
            else:
                raise SystemExit(f"unknown model {name!r} (smollm2, tiny)")


if __name__ == "__main__":
    main()
