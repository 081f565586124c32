"""The API formats as pure functions (no cluster): every bad body gets a 400 (404 for a model)
naming the parameter, good bodies become the router's request, and answers have each API's shape."""

from __future__ import annotations

import json

import pytest

from coordinator import anthropic_format, openai_format
from coordinator.http_params import ApiError
from pomona.proto import coordinator_pb2

SERVED = ["tiny", "/models/tiny"]
USER = [{"role": "user", "content": "hi"}]

CHAT_ERRORS = [
    ("n", {"messages": USER, "n": 2}, "`n` must be 1"),
    ("model", {"messages": USER, "model": "gpt-x"}, "does not exist here"),
    ("no-messages", {}, "`messages` must be a non-empty list"),
    ("role", {"messages": [{"role": "tool", "content": "x"}]}, "role must be one of"),
    ("content-type", {"messages": [{"role": "user", "content": 3}]}, "must be a string or a list"),
    ("image", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ("temperature", {"messages": USER, "temperature": 2.5}, "`temperature` must be a number from 0 to 2"),
    ("top_p", {"messages": USER, "top_p": "high"}, "`top_p` must be a number"),
    ("max_tokens", {"messages": USER, "max_tokens": 0}, "`max_tokens` must be a whole number of at least 1"),
    ("over-limit", {"messages": USER, "max_completion_tokens": 101}, "allows at most 100 new tokens"),
    ("stop", {"messages": USER, "stop": [1]}, "`stop` must be a string or a list"),
    ("seed", {"messages": USER, "seed": 1.5}, "`seed` must be a whole number"),
    ("top_logprobs", {"messages": USER, "top_logprobs": 2}, "needs `logprobs: true`"),
    ("too-many-top", {"messages": USER, "logprobs": True, "top_logprobs": 21}, "from 0 to 20"),
    ("stream", {"messages": USER, "stream": "yes"}, "`stream` must be true or false"),
    ("tools", {"messages": USER, "tools": [{"type": "function"}]}, "`tools` is not supported"),
]


@pytest.mark.parametrize("body,message", [c[1:] for c in CHAT_ERRORS], ids=[c[0] for c in CHAT_ERRORS])
def test_chat_errors(body, message):
    with pytest.raises(ApiError) as info:
        openai_format.parse_chat(body, SERVED, 100)
    assert message in info.value.message
    assert info.value.status == (404 if "does not exist" in message else 400)
    shape = openai_format.error_body(info.value)["error"]
    assert shape["type"] == "invalid_request_error" and shape["message"] == info.value.message


def test_chat_request():
    body = {
        "model": "/models/tiny",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
        ],
        "max_completion_tokens": 9,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": -1,
        "stop": "x",
        "logprobs": True,
        "top_logprobs": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parsed = openai_format.parse_chat(body, SERVED, 100)
    request = parsed.request
    assert parsed.model == "tiny" and parsed.stream and parsed.include_usage
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "ab"),
        ("assistant", "c"),
    ]
    assert request.max_tokens == 9 and list(request.stop) == ["x"]
    sampling = request.sampling
    assert sampling.temperature == pytest.approx(0.5) and sampling.top_p == pytest.approx(0.9)
    assert sampling.seed == (1 << 64) - 1 and sampling.logprobs and sampling.top_logprobs == 3
    defaults = openai_format.parse_chat({"messages": USER}, SERVED, 100)
    assert defaults.request.sampling.temperature == 1.0 and not defaults.request.sampling.HasField("seed")
    assert defaults.request.max_tokens == 0  # the cluster's default


def test_completion_request():
    parsed = openai_format.parse_completion({"prompt": ["raw text"], "logprobs": 2}, SERVED, 100)
    assert parsed.request.raw and parsed.request.prompt == "raw text"
    assert parsed.logprobs and parsed.request.sampling.top_logprobs == 2
    with pytest.raises(ApiError, match="one prompt per request"):
        openai_format.parse_completion({"prompt": ["a", "b"]}, SERVED, 100)


def _summary(**fields) -> coordinator_pb2.GenerateSummary:
    return coordinator_pb2.GenerateSummary(
        prompt_tokens=5,
        generated_tokens=3,
        energy_j=1.5,
        j_per_token=0.5,
        energy_source="estimated (test)",
        **fields,
    )


def _events(raw: list[bytes]) -> list[str]:
    return [event.decode() for event in raw]


def test_chat_stream_shape():
    parsed = openai_format.parse_chat({"messages": USER, "stream": True}, SERVED, 100)
    answer = openai_format.OpenAiAnswer(parsed, lambda ids: "".join(chr(97 + i) for i in ids), chat=True)
    head = _events(answer.stream_head(5))
    delta = _events(answer.stream_delta(coordinator_pb2.GenerateChunk(text="ab", token_ids=[0])))
    held = answer.stream_delta(coordinator_pb2.GenerateChunk(text="", token_ids=[1]))  # held back
    tail = _events(answer.stream_tail(_summary(finish_reason="length")))
    assert held == []
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in head + delta + tail)
    first = json.loads(head[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(delta[0][6:])["choices"][0]["delta"] == {"content": "ab"}
    assert json.loads(tail[0][6:])["choices"][0]["finish_reason"] == "length"
    assert tail[-1] == "data: [DONE]\n\n" and len(tail) == 2  # no usage chunk unless asked


def test_anthropic_errors_and_stop_reasons():
    with pytest.raises(ApiError, match="`max_tokens` is required"):
        anthropic_format.parse_messages({"messages": USER}, SERVED, 100)
    with pytest.raises(ApiError, match="user or assistant"):
        anthropic_format.parse_messages(
            {"max_tokens": 3, "messages": [{"role": "system", "content": "x"}]}, SERVED, 100
        )
    parsed = anthropic_format.parse_messages(
        {
            "max_tokens": 3,
            "system": [{"type": "text", "text": "s"}],
            "messages": USER,
            "stop_sequences": ["END", "zz"],
        },
        SERVED,
        100,
    )
    assert [m.role for m in parsed.request.messages] == ["system", "user"]
    decode = {(1, 2): "fooEND", (1,): "foo"}.get
    answer = anthropic_format.AnthropicAnswer(parsed, lambda ids: decode(tuple(ids)))
    stopped = answer.response(_summary(finish_reason="stop", token_ids=[1, 2]))
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")
    assert answer.response(_summary(finish_reason="stop", token_ids=[1]))["stop_reason"] == "end_turn"
    assert answer.response(_summary(finish_reason="length", token_ids=[1]))["stop_reason"] == "max_tokens"
    error = anthropic_format.error_body(ApiError(429, "rate_limit", "busy"))
    assert error == {"type": "error", "error": {"type": "rate_limit_error", "message": "busy"}}
