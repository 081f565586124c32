"""The upcycled SmolLM2 MoE (worker/upcycle.py): mlx-lm loads it strictly; without noise it is the
dense model's function; with noise its router spreads tokens over the experts; and a 3-node
expert-parallel cluster generates single-process mlx-lm's greedy tokens from it."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from cluster_helpers import running_cluster
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_attention_mask
from mlx_lm.utils import load_model

from pomona.fetch import fetch_default_model
from pomona.tokenizer import load_tokenizer
from worker.gguf_loader import build_model, load_gguf
from worker.upcycle import upcycle

QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": QUESTION}]
CLUSTER_TOKENS = 12


def _greedy(model, prompt: list[int], count: int) -> tuple[list[int], mx.array]:
    """``count`` greedy tokens and the first step's log-probabilities."""
    steps = generate_step(mx.array(prompt), model, sampler=lambda x: mx.argmax(x, axis=-1))
    first_token, first_logprobs = next(steps)
    tokens = [int(first_token)] + [int(token) for token, _ in (next(steps) for _ in range(count - 1))]
    return tokens, first_logprobs


@pytest.fixture(scope="module")
def gguf():
    return fetch_default_model(quiet=True)


@pytest.fixture(scope="module")
def noisy_moe(gguf, tmp_path_factory):
    """The demo checkpoint (8 experts, top-2, noise 0.05) and its single-process greedy tokens."""
    out_dir = upcycle(gguf, tmp_path_factory.mktemp("moe") / "smollm2-moe", noise=0.05)
    model, _ = load_model(out_dir, strict=True)
    prompt = load_tokenizer(out_dir).encode_chat(MESSAGES)
    expected, _ = _greedy(model, prompt, CLUSTER_TOKENS)
    return out_dir, model, prompt, expected


def test_noise_free_upcycle_is_the_dense_model(gguf, tmp_path):
    out_dir = upcycle(gguf, tmp_path / "moe", num_experts=4)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)

    prompt = load_tokenizer(gguf).encode_chat(MESSAGES)
    assert load_tokenizer(out_dir).encode_chat(MESSAGES) == prompt

    dense_tokens, dense_logprobs = _greedy(build_model(load_gguf(gguf)), prompt, 10)
    moe, _ = load_model(out_dir, strict=True)
    assert moe.layers[0].block_sparse_moe.switch_mlp.gate_proj.bits == 4
    assert moe.model.embed_tokens.bits == 8
    moe_tokens, moe_logprobs = _greedy(moe, prompt, 10)
    assert moe_tokens == dense_tokens
    np.testing.assert_allclose(np.array(moe_logprobs), np.array(dense_logprobs), atol=1e-3)
    text = load_tokenizer(out_dir).decode(moe_tokens)
    assert text.startswith("The capital of France is Paris.")


def test_noisy_router_uses_several_experts(noisy_moe):
    _, model, prompt, expected = noisy_moe
    layer = model.layers[0]
    moe = layer.block_sparse_moe
    # Layer 0's MoE input for the prompt, computed as the decoder layer does.
    hidden = model.model.embed_tokens(mx.array(prompt)[None])  # [1, L, D]
    mask = create_attention_mask(hidden, None)
    hidden = hidden + layer.self_attn(layer.input_layernorm(hidden), mask)
    gates = moe.gate(layer.post_attention_layernorm(hidden))  # [1, L, E]
    k = moe.num_experts_per_tok
    chosen = np.array(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])
    assert len(np.unique(chosen)) >= 3
    assert len(expected) == CLUSTER_TOKENS


def test_expert_parallel_cluster_matches_single_process(noisy_moe, tmp_path):
    out_dir, _, prompt, expected = noisy_moe
    experts = [
        {"node": "b", "layers": [0, 30], "experts": [0, 4]},
        {"node": "c", "layers": [0, 30], "experts": [4, 8]},
    ]
    with running_cluster(tmp_path, out_dir, 3, [(0, 30)], experts) as cluster:
        summary = cluster.generate(QUESTION, max_tokens=CLUSTER_TOKENS)
        stats = cluster.expert_stats()
    assert summary.prompt_tokens == len(prompt)
    assert list(summary.token_ids) == expected
    print(f"expert-parallel cluster: {summary.text!r}")
    words = summary.text.split()
    assert "Paris" in summary.text and all(word.isascii() for word in words), summary.text
    busy = {node.node for node in stats.nodes if node.stats.layers}
    assert {"b", "c"} <= busy, "both expert nodes should have computed tokens"
