"""Prompt cache benchmark: a conversation whose every turn resends the whole history (as chat
clients do), against two Pomona clusters on loopback, one with the prompt cache (the default) and
one without (`prompt_cache_tokens: 0`), and single-process mlx-lm prefilling each turn's prompt
from scratch, in one run.

Prints per turn: prompt tokens, tokens taken from the cache, time to first token with and without
the cache and single-process mlx-lm's, and the ratios. Each turn's greedy tokens are compared
between the two clusters and mlx-lm.

    .venv/bin/python bench/prompt_cache_bench.py [--model tiny|smollm2] [--turns 4] [--stages 2]
        [--rounds 3] [--system-repeats 12]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster_helpers import running_cluster  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

from pomona.fetch import fetch_default_model  # noqa: E402
from pomona.tokenizer import load_tokenizer  # noqa: E402
from worker.gguf_loader import build_model, load_gguf  # noqa: E402

SYSTEM = (
    "You are a helpful assistant running on a cluster of small computers. Answer briefly, name "
    "the computers you ran on when asked, and keep to the facts you were given. "
)
QUESTIONS = [
    " User: what runs where? Assistant:",
    " User: and how fast is it? Assistant:",
    " User: what does it cost in energy? Assistant:",
    " User: what happens when one of them fails? Assistant:",
    " User: can it serve several people at once? Assistant:",
    " User: thank you; anything else? Assistant:",
]
NEW_TOKENS = 24


def mlx_lm_turn(model, prompt_ids: list[int]) -> tuple[float, list[int]]:
    """(time to first token, greedy tokens) of single-process mlx-lm prefilling the whole prompt."""
    started = time.perf_counter()
    greedy = lambda x: mx.argmax(x, -1)  # noqa: E731
    steps = generate_step(mx.array(prompt_ids), model, max_tokens=NEW_TOKENS, sampler=greedy)
    first, _ = next(steps)
    ttft = time.perf_counter() - started
    return ttft, [int(first)] + [int(token) for token, _ in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="conversations; each turn keeps its best")
    parser.add_argument("--model", default="tiny", help="tiny (a random llama) or smollm2 (the default)")
    parser.add_argument("--system-repeats", type=int, default=12, help="the system prompt's length")
    args = parser.parse_args()
    layers = {"tiny": 6, "smollm2": 30}[args.model]
    layout = [(layers * i // args.stages, layers * (i + 1) // args.stages) for i in range(args.stages)]
    with tempfile.TemporaryDirectory(prefix="pomona-prompt-cache-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if args.model == "smollm2":
            path = fetch_default_model(True)
            tokenizer, model = load_tokenizer(path), build_model(load_gguf(path))
        else:
            path = make_tiny_checkpoint("llama", work / "tiny-llama")
            tokenizer, model = load_tokenizer(path), load_model(path)[0]
        clusters = {
            "cache": stack.enter_context(running_cluster(work / "on", path, args.stages, layout)),
            "no cache": stack.enter_context(running_cluster(
                work / "off", path, args.stages, layout, generation={"prompt_cache_tokens": 0}
            )),
        }
        best: dict[tuple[str, int], float] = {}
        cached: dict[int, int] = {}
        prompts: dict[int, int] = {}
        same = True
        for round_index in range(args.rounds):
            # Each round its own conversation (a different opening), so nothing carries over
            # from the last round but what a real server would also have: other conversations.
            history = f"Conversation {round_index}. {SYSTEM * args.system_repeats}"
            for turn in range(args.turns):
                history += QUESTIONS[turn % len(QUESTIONS)]
                ids = tokenizer.encode(history)
                ttft, expected = mlx_lm_turn(model, ids)
                best["mlx-lm", turn] = min(best.get(("mlx-lm", turn), float("inf")), ttft)
                answers = {}
                for label, cluster in clusters.items():
                    summary = cluster.generate(history, raw=True, max_tokens=NEW_TOKENS)
                    best[label, turn] = min(best.get((label, turn), float("inf")), summary.ttft_s)
                    answers[label] = list(summary.token_ids)
                    if label == "cache":
                        cached[turn], prompts[turn] = summary.cached_prompt_tokens, summary.prompt_tokens
                same = same and answers["cache"] == answers["no cache"] == expected
                history += tokenizer.decode(answers["cache"])
    print(f"\n== {args.model}, {args.stages} stages, {NEW_TOKENS} new tokens a turn, whole history resent "
          f"each turn; TTFT best of {args.rounds} conversations ==")
    print(f"{'turn':>4}{'prompt':>8}{'cached':>8}{'no cache':>13}{'cache':>12}{'mlx-lm':>12}"
          f"{'cache / no':>12}{'cache / mlx-lm':>16}")
    for turn in range(args.turns):
        off, on, reference = best["no cache", turn], best["cache", turn], best["mlx-lm", turn]
        print(f"{turn + 1:>4}{prompts[turn]:>8}{cached[turn]:>8}{off * 1e3:>10.1f} ms"
              f"{on * 1e3:>9.1f} ms{reference * 1e3:>9.1f} ms{on / off:>12.2f}{on / reference:>16.2f}")
    verdict = "yes" if same else "NO"
    print(f"greedy tokens the same with and without the cache and in mlx-lm, every turn: {verdict}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
