"""The HTTP API of a real 2-stage cluster (tiny random llama): the `openai` client, `curl -N`, the
Anthropic Messages API over plain HTTP, and each API's errors. What the HTTP API returns is
checked against the cluster's own gRPC answers (themselves checked against single-process mlx-lm
in test_pipeline.py) and, for logprobs, against mlx-lm's logits."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import openai
import pytest
from cluster_helpers import running_cluster
from http_helpers import api_url, get, post_json, sse_events
from layouts import LAYOUTS, PROMPT
from tiny_models import make_tiny_checkpoint, reference_logits

from pomona.tokenizer import load_tokenizer

MAX_CONTEXT = 160
API_MAX_TOKENS = 64
QUESTION = "Tell me about the layers and the nodes."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("http_api")
    path = make_tiny_checkpoint("llama", root / "llama")
    directory = root / "cluster"
    with running_cluster(
        directory, path, 2, LAYOUTS["llama"][2], generation={"max_context": MAX_CONTEXT}
    ) as cluster:
        # The cluster.yaml written by running_cluster has an api port; limits on top of it.
        url = api_url(directory)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        yield cluster, url, client, model, path


def test_models_health_and_url(served):
    cluster, url, client, model, path = served
    assert model == path.name
    assert "HTTP API (OpenAI and Anthropic) at " + url in cluster.up_output
    status, _, body = get(f"{url}/health")
    assert status == 200 and body["status"] == "ok"


def test_chat_matches_grpc_with_usage_and_energy(served):
    cluster, url, client, model, _ = served
    expected = cluster.generate(QUESTION, max_tokens=12, ignore_eos=False)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.generated_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.generated_tokens
    extra = reply.usage.model_extra
    assert extra["energy_j"] > 0 and extra["energy_source"].startswith("estimated")
    assert extra["j_per_token"] == pytest.approx(extra["energy_j"] / expected.generated_tokens)


def test_content_parts_system_and_max_completion_tokens(served):
    cluster, url, client, model, _ = served
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "more."}],
        },
    ]
    as_string = [messages[0], {"role": "user", "content": "Tell me more."}]
    first = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=5, temperature=0
    )
    second = client.chat.completions.create(model=model, messages=as_string, max_tokens=5, temperature=0)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens <= 5


def test_streaming_chat_equals_non_streaming(served):
    cluster, url, client, model, _ = served
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # Without include_usage there is no usage chunk.
    plain = list(client.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain)


def test_completions_match_grpc_raw(served):
    cluster, url, client, model, _ = served
    expected = cluster.generate(PROMPT, raw=True, max_tokens=10, ignore_eos=False)
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    streamed = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_ignore_eos_generates_past_the_end_of_sequence(served):
    cluster, url, client, model, _ = served
    prompt = "the red"  # greedy on this checkpoint: end of sequence as its 6th token
    ends = cluster.generate(prompt, raw=True, max_tokens=12, ignore_eos=False)
    assert ends.finish_reason == "stop" and ends.generated_tokens < 12
    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.choices[0].text == cluster.generate(prompt, raw=True, max_tokens=12, ignore_eos=True).text
    status, _, body = post_json(f"{url}/v1/completions", {"model": model, "prompt": "x", "ignore_eos": "yes"})
    assert status == 400 and "ignore_eos" in body["error"]["message"], body


def test_stop_list_cuts_and_never_leaks(served):
    cluster, url, client, model, _ = served
    full = cluster.generate(PROMPT, raw=True, max_tokens=24, ignore_eos=True).text
    assert len(full) > 12, full
    stop = full[6:10]  # a stop string that spans what are likely several tokens
    before = full[: full.find(stop)]
    reply = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=["never-seen", stop]
    )
    if reply.choices[0].finish_reason == "stop" and reply.choices[0].text != before:
        pytest.fail(f"EOS before the stop string? {reply.choices[0].text!r} vs {before!r}")
    assert reply.choices[0].text == before and reply.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
        )
    ]
    assert "".join(pieces) == before
    assert not any(stop in piece for piece in pieces)


def test_seeded_sampling_is_reproducible(served):
    cluster, url, client, model, _ = served

    def sample(seed):
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
        )
        return reply.choices[0].text

    first, second, other = sample(11), sample(11), sample(12)
    assert first == second
    assert first != other


def test_logprobs_are_mlx_lms(served):
    """The first token's logprob and top alternatives equal log-softmax of mlx-lm's logits."""
    cluster, url, client, model, path = served
    tokenizer = load_tokenizer(path)
    logits = reference_logits(path, tokenizer.encode(PROMPT)).astype(np.float64)
    reference = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    best = np.argsort(-reference)[:3]
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3
    assert lp.tokens[0] == tokenizer.decode([int(best[0])])
    assert lp.token_logprobs[0] == pytest.approx(reference[best[0]], abs=1e-3)
    # A dict by token text (two ids may decode alike, as with partial UTF-8): check by text.
    top = lp.top_logprobs[0]
    for token_id in best:
        text = tokenizer.decode([int(token_id)])
        assert top[text] == pytest.approx(
            max(reference[i] for i in best if tokenizer.decode([int(i)]) == text), abs=1e-3
        )
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:  # greedy: the sampled token is the most likely one
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_openai_errors(served):
    cluster, url, client, model, _ = served
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="`n` must be 1"):
        client.chat.completions.create(model=model, messages=messages, n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        client.chat.completions.create(model="gpt-17", messages=messages)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=messages, temperature=7)
    with pytest.raises(openai.BadRequestError, match="context holds"):
        client.completions.create(model=model, prompt=PROMPT * 20, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="at most 4096 new tokens"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=5000)
    status, _, body = post_json(f"{url}/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, _, body = post_json(
        f"{url}/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}
    )
    assert status == 400 and "role" in body["error"]["message"]
    status, _, body = post_json(
        f"{url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    )
    assert status == 400 and "only text parts" in body["error"]["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    status, _, body = post_json(f"{url}/v1/chat/completions", {"messages": messages, "tools": tools})
    assert status == 400 and body["error"]["param"] == "tools" and "not supported" in body["error"]["message"]
    # Nothing leaked into the pipeline from the refused requests.
    assert all(stage.active_requests == 0 for stage in cluster.status().stages)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_sse(served):
    cluster, url, client, model, _ = served
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
    }
    result = subprocess.run(
        [
            "curl",
            "-sN",
            f"{url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    events = [data for _, data in sse_events(result.stdout)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = (
        client.chat.completions.create(model=model, messages=body["messages"], max_tokens=6, temperature=0)
        .choices[0]
        .message.content
    )
    assert streamed == whole


def test_anthropic_messages(served):
    cluster, url, client, model, _ = served
    expected = cluster.generate(QUESTION, max_tokens=10, ignore_eos=False)
    body = {
        "model": model,
        "max_tokens": 10,
        "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
    }
    status, _, reply = post_json(f"{url}/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert status == 200, reply
    assert reply["type"] == "message" and reply["role"] == "assistant"
    assert reply["content"] == [{"type": "text", "text": expected.text}]
    assert reply["stop_reason"] == {"length": "max_tokens", "stop": "end_turn"}[expected.finish_reason]
    # The same prompt ran just before: all but its last token come from the prompt cache, which
    # Anthropic counts apart from input_tokens.
    assert reply["usage"]["cache_read_input_tokens"] == expected.prompt_tokens - 1
    assert reply["usage"]["input_tokens"] == 1
    assert reply["usage"]["output_tokens"] == expected.generated_tokens
    assert reply["usage"]["energy_source"].startswith("estimated")

    status, headers, text = post_json(f"{url}/v1/messages", {**body, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == n for (n, _), d in zip(events, data))
    assert data[0]["message"]["usage"]["input_tokens"] == expected.prompt_tokens
    deltas = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
    assert deltas == expected.text
    assert data[-2]["delta"]["stop_reason"] == reply["stop_reason"]


def test_anthropic_stop_sequences_and_system(served):
    cluster, url, client, model, _ = served
    full = cluster.generate(QUESTION, max_tokens=24, ignore_eos=True).text
    stop = full[5:8]
    body = {
        "model": model,
        "max_tokens": 24,
        "temperature": 0,
        "stop_sequences": [stop],
        "messages": [{"role": "user", "content": QUESTION}],
    }
    status, _, reply = post_json(f"{url}/v1/messages", body)
    assert status == 200, reply
    if reply["stop_reason"] == "stop_sequence":
        assert reply["stop_sequence"] == stop
        assert reply["content"][0]["text"] == full[: full.find(stop)]
    else:  # EOS came first in the untouched output
        assert reply["stop_reason"] == "end_turn"
    status, _, with_system = post_json(f"{url}/v1/messages", {**body, "system": "Be brief."})
    assert status == 200


def test_anthropic_errors(served):
    cluster, url, client, model, _ = served
    messages = [{"role": "user", "content": "hi"}]
    status, _, body = post_json(f"{url}/v1/messages", {"model": model, "messages": messages})
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "max_tokens" in body["error"]["message"]
    status, _, body = post_json(
        f"{url}/v1/messages", {"model": "claude-9", "max_tokens": 4, "messages": messages}
    )
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, _, body = post_json(
        f"{url}/v1/messages",
        {"model": model, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}, *messages]},
    )
    assert status == 400 and "top-level `system`" in body["error"]["message"]
    status, _, body = post_json(
        f"{url}/v1/messages", {"model": model, "max_tokens": 4, "temperature": 1.5, "messages": messages}
    )
    assert status == 400 and "temperature" in body["error"]["message"]
    status, _, body = post_json(
        f"{url}/v1/messages", {"max_tokens": 4, "messages": messages, "tools": [{"name": "f"}]}
    )
    assert status == 400 and "`tools` is not supported" in body["error"]["message"]
