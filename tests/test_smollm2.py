"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): clusters of 1, 2 and 3 stages with
uneven splits generate exactly single-process mlx-lm's greedy tokens for a chat prompt."""

from __future__ import annotations

import mlx.core as mx
import pytest
from cluster_helpers import running_cluster
from mlx_lm.generate import generate_step

from pomona.fetch import fetch_default_model
from pomona.tokenizer import load_tokenizer
from worker.gguf_loader import build_model, load_gguf

QUESTION = "What is the capital of France?"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    path = fetch_default_model(quiet=True)
    prompt = load_tokenizer(path).encode_chat([{"role": "user", "content": QUESTION}])
    model = build_model(load_gguf(path))
    steps = generate_step(mx.array(prompt), model, sampler=lambda x: mx.argmax(x, axis=-1))
    expected = [int(token) for token, _ in (next(steps) for _ in range(NEW_TOKENS))]
    del model
    return path, expected


@pytest.mark.parametrize(
    "stages",
    [[(0, 30)], [(0, 11), (11, 30)], [(0, 7), (7, 19), (19, 30)]],
    ids=["1-stage", "2-stage", "3-stage"],
)
def test_smollm2_cluster_matches_single_process(smollm2, tmp_path, stages):
    path, expected = smollm2
    with running_cluster(tmp_path, "default", len(stages), stages) as cluster:
        summary = cluster.generate(QUESTION, max_tokens=NEW_TOKENS)
        assert list(summary.token_ids) == expected
        assert summary.text.startswith("The capital of France is Paris.")
