"""The real default model (SmolLM2-135M-Instruct) on a 2-stage cluster, end to end over HTTP: the
`openai` client's greedy answer is the text single-process mlx-lm gives (the oracle of
test_smollm2.py), streamed or not, and the Anthropic API says the same."""

from __future__ import annotations

import openai
from cluster_helpers import running_cluster
from http_helpers import api_url, post_json

QUESTION = "What is the capital of France?"


def test_smollm2_over_http(tmp_path):
    directory = tmp_path / "cluster"
    with running_cluster(directory, "default", 2, [(0, 11), (11, 30)]):
        url = api_url(directory)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        assert "SmolLM2" in model
        messages = [{"role": "user", "content": QUESTION}]
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == "The capital of France is Paris."
        assert reply.choices[0].finish_reason == "stop"  # the model's end-of-turn token
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=24, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "The capital of France is Paris."
        status, _, message = post_json(
            f"{url}/v1/messages", {"model": model, "max_tokens": 24, "temperature": 0, "messages": messages}
        )
        assert status == 200, message
        assert message["content"][0]["text"] == "The capital of France is Paris."
        assert message["stop_reason"] == "end_turn"
