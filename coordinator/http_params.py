"""Reading an HTTP request's JSON body into a Pomona request: typed parameter checks shared by the
OpenAI and Anthropic formats, each failing with `ApiError` naming the parameter and the fix.

`ApiError` carries an HTTP status and a kind (`invalid_request`, `authentication`, `not_found`,
`rate_limit`, `overloaded`, `server`); each format module turns it into its own error JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pomona.proto import coordinator_pb2, worker_pb2


class ApiError(Exception):
    def __init__(
        self, status: int, kind: str, message: str, param: str | None = None, retry_after_s: int | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.message, self.param = status, kind, message, param
        self.retry_after_s = retry_after_s


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, param)


@dataclass
class ParsedRequest:
    """What a format module made of a body: the request for the router and how to answer."""

    request: coordinator_pb2.GenerateRequest
    model: str
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    logprobs: bool = False
    top_logprobs: int = 0
    stop: Sequence[str] = field(default_factory=tuple)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value) or not low <= value <= high:
        raise bad_request(f"`{name}` must be a number from {low:g} to {high:g}, got {value!r}", name)
    return float(value)


def integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise bad_request(f"`{name}` must be a whole number {span}, got {value!r}", name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"`{name}` must be true or false, got {value!r}", name)
    return value


def stop_strings(body: dict, name: str, limit: int = 16) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > limit:
        raise bad_request(f"`{name}` must be a string or a list of at most {limit} strings", name)
    return tuple(s for s in value if s)


def text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (`{"type": "text", "text": ...}`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(
                    f"{where}.content[{index}] is a {kind!r} part; only text parts "
                    '({"type": "text", "text": "..."}) are supported',
                    "messages",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}.content must be a string or a list of text parts", "messages")


def sampling(
    body: dict, *, temperature_max: float, logprobs: bool, top_logprobs: int
) -> worker_pb2.SamplingParams:
    """temperature, top_p, top_k, seed (shared names in both APIs); defaults as the APIs'."""
    params = worker_pb2.SamplingParams(
        temperature=number(body, "temperature", 1.0, 0.0, temperature_max),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=integer(body, "top_k", 0, 0),
        min_p=number(body, "min_p", 0.0, 0.0, 1.0),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise bad_request(f"`seed` must be a whole number, got {seed!r}", "seed")
        params.seed = seed % (1 << 64)
    return params


def max_new_tokens(body: dict, names: Sequence[str], limit: int, required: bool = False) -> int:
    """The first of `names` that is set (0: the cluster's default), within api.max_tokens."""
    for name in names:
        value = integer(body, name, None, 1)
        if value is not None:
            if value > limit:
                raise bad_request(
                    f"`{name}` is {value}, but this server allows at most {limit} new tokens per "
                    "request (api.max_tokens in cluster.yaml)",
                    name,
                )
            return value
    if required:
        raise bad_request(f"`{names[0]}` is required", names[0])
    return 0


def refuse_unsupported(body: dict, names: Sequence[str]) -> None:
    """A 400 for features that would otherwise be silently ignored (tools, structured output)."""
    for name in names:
        if body.get(name):
            raise bad_request(f"`{name}` is not supported by this server (text generation only)", name)


def require_model(body: dict, served: Sequence[str]) -> str:
    """The requested model id; absent means the one served. Unknown: 404."""
    model = body.get("model")
    if model is None:
        return served[0]
    if not isinstance(model, str):
        raise bad_request("`model` must be a string", "model")
    if model not in served:
        raise ApiError(
            404,
            "not_found",
            f"the model {model!r} does not exist here; this server has {served[0]!r} "
            "(GET /v1/models lists it)",
            "model",
        )
    return served[0]
