"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): clusters of 1, 2 and 3 stages with
uneven splits generate exactly the greedy tokens of single-process mlx-lm.

The reference shares nothing with Pomona's GGUF loader: the ``gguf`` package dequantizes the file
into an mlx-lm checkpoint directory (tests/gguf_models.py) that ``mlx_lm.utils.load_model`` loads.
"""

from __future__ import annotations

import pytest
from cluster_helpers import running_cluster
from gguf_models import dequantized_checkpoint, llama_config
from tiny_models import reference_generate

from pomona.fetch import fetch_default_model
from pomona.tokenizer import load_tokenizer

QUESTION = "What is the capital of France?"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = fetch_default_model(quiet=True)
    prompt = load_tokenizer(path).encode_chat([{"role": "user", "content": QUESTION}])
    reference = dequantized_checkpoint(path, llama_config(path), tmp_path_factory.mktemp("smollm2"))
    return path, reference_generate(reference, prompt, NEW_TOKENS)


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
