"""The OpenAI formats: `/v1/chat/completions` and `/v1/completions` bodies in, their JSON and SSE
events (`chat.completion.chunk`, `text_completion`, `data: [DONE]`) out, and OpenAI's error shape.

Pure functions of the request body and of the router's chunks; the HTTP shell is
`coordinator.http_api`. Usage carries Pomona's energy fields (`energy_j`, `j_per_token`,
`energy_source`) next to OpenAI's token counts.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pomona.proto import coordinator_pb2

from .http_params import (
    ApiError,
    ParsedRequest,
    bad_request,
    boolean,
    integer,
    max_new_tokens,
    refuse_unsupported,
    require_model,
    sampling,
    stop_strings,
    text_content,
)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "overloaded": "server_overloaded",
    "server": "server_error",
}
ERROR_CODES = {"not_found": "model_not_found", "authentication": "invalid_api_key"}


def _check_n(body: dict) -> None:
    if integer(body, "n", 1, 1) != 1:
        raise bad_request("`n` must be 1: Pomona generates one choice per request", "n")


def _common(
    body: dict,
    served: Sequence[str],
    max_tokens_limit: int,
    token_names: Sequence[str],
    logprobs: bool,
    top_logprobs: int,
) -> ParsedRequest:
    model = require_model(body, served)
    _check_n(body)
    refuse_unsupported(body, ("tools", "functions", "tool_choice", "response_format", "suffix"))
    stream = boolean(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("`stream_options` must be an object", "stream_options")
    stop = stop_strings(body, "stop")
    request = coordinator_pb2.GenerateRequest(
        max_tokens=max_new_tokens(body, token_names, max_tokens_limit),
        sampling=sampling(body, temperature_max=2.0, logprobs=logprobs, top_logprobs=top_logprobs),
        stop=list(stop),
        # vLLM's extra parameter: generate past the end-of-sequence token (benchmarks use it)
        ignore_eos=boolean(body, "ignore_eos"),
    )
    return ParsedRequest(
        request, model, stream, boolean(options, "include_usage"), logprobs, top_logprobs, stop
    )


def parse_chat(body: dict, served: Sequence[str], max_tokens_limit: int) -> ParsedRequest:
    logprobs = boolean(body, "logprobs")
    top = integer(body, "top_logprobs", 0, 0, 20)
    if top and not logprobs:
        raise bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    parsed = _common(body, served, max_tokens_limit, ("max_completion_tokens", "max_tokens"), logprobs, top)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {role, content}", "messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise bad_request(
                f"{where}.role must be one of system, user, assistant, not {role!r}", "messages"
            )
        content = text_content(message.get("content", ""), where)
        parsed.request.messages.add(role=ROLES[message["role"]], content=content)
    return parsed


def parse_completion(body: dict, served: Sequence[str], max_tokens_limit: int) -> ParsedRequest:
    top = integer(body, "logprobs", None, 0, 5)
    parsed = _common(body, served, max_tokens_limit, ("max_tokens",), top is not None, top or 0)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("`prompt` must be a string (one prompt per request)", "prompt")
    if boolean(body, "echo"):
        raise bad_request("`echo` is not supported", "echo")
    parsed.request.prompt, parsed.request.raw = prompt, True
    return parsed


def usage(summary: coordinator_pb2.GenerateSummary) -> dict:
    result = {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.generated_tokens,
        "total_tokens": summary.prompt_tokens + summary.generated_tokens,
        # Prompt tokens taken from the prompt cache (not prefilled), as OpenAI reports them.
        "prompt_tokens_details": {"cached_tokens": summary.cached_prompt_tokens},
    }
    if summary.energy_source:
        result.update(
            energy_j=summary.energy_j, j_per_token=summary.j_per_token, energy_source=summary.energy_source
        )
    return result


def error_body(error: ApiError) -> dict:
    return {
        "error": {
            "message": error.message,
            "type": ERROR_TYPES.get(error.kind, "server_error"),
            "param": error.param,
            "code": ERROR_CODES.get(error.kind),
        }
    }


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


@dataclass
class OpenAiAnswer:
    """One request's answer in the making: chunks in, JSON or SSE events out."""

    parsed: ParsedRequest
    decode: Callable[[Sequence[int]], str]
    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # of every token, in the format's shape

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _envelope(self, choices: list, chunk: bool) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        kind = self._object + (".chunk" if chunk and self.chat else "")
        return {
            "id": prefix + self.id,
            "object": kind,
            "created": self.created,
            "model": self.parsed.model,
            "choices": choices,
        }

    def _token_logprobs(self, chunk: coordinator_pb2.GenerateChunk) -> list:
        entries = []
        for token_id, lp in zip(chunk.token_ids, chunk.logprobs):
            token = self.decode([token_id])
            top = [(self.decode([t]), v) for t, v in zip(lp.top_token_ids, lp.top_logprobs)]
            if self.chat:
                entries.append(
                    {
                        "token": token,
                        "logprob": lp.logprob,
                        "bytes": list(token.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top
                        ],
                    }
                )
            else:
                by_text: dict[str, float] = {}
                for text, value in top:  # most likely first: a text shared by two ids keeps the larger
                    by_text.setdefault(text, value)
                entries.append((token, lp.logprob, by_text))
        return entries

    def _logprobs_field(self, entries: list, text_start: int = 0) -> dict | None:
        if not self.parsed.logprobs:
            return None
        if self.chat:
            return {"content": entries}
        offsets, at = [], text_start
        for token, _, _ in entries:
            offsets.append(at)
            at += len(token)
        return {
            "tokens": [e[0] for e in entries],
            "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries],
            "text_offset": offsets,
        }

    def _choice(self, text: str, finish_reason: str | None, logprobs: dict | None, delta: bool) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs}
        if self.chat:
            key = "delta" if delta else "message"
            choice[key] = (
                {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
            )
        else:
            choice["text"] = text
        return choice

    # -- streaming ----------------------------------------------------------------------------

    def stream_head(self, prompt_tokens: int) -> list[bytes]:
        if not self.chat:
            return []
        first = self._choice("", None, None, delta=True)
        first["delta"] = {"role": "assistant", "content": ""}
        return [sse(self._envelope([first], chunk=True))]

    def stream_delta(self, chunk: coordinator_pb2.GenerateChunk) -> list[bytes]:
        entries = self._token_logprobs(chunk) if self.parsed.logprobs else []
        if not chunk.text and not entries:
            return []
        start = sum(len(t) for t in self.text)
        self.text.append(chunk.text)
        logprobs = self._logprobs_field(entries, start)
        return [sse(self._envelope([self._choice(chunk.text, None, logprobs, delta=True)], chunk=True))]

    def stream_tail(self, summary: coordinator_pb2.GenerateSummary) -> list[bytes]:
        final = self._choice("", summary.finish_reason, None, delta=True)
        events = [sse(self._envelope([final], chunk=True))]
        if self.parsed.include_usage:
            events.append(sse({**self._envelope([], chunk=True), "usage": usage(summary)}))
        return events + [sse("[DONE]")]

    def stream_error(self, error: ApiError) -> list[bytes]:
        return [sse(error_body(error)), sse("[DONE]")]

    # -- one response -------------------------------------------------------------------------

    def add(self, chunk: coordinator_pb2.GenerateChunk) -> None:
        self.text.append(chunk.text)
        if self.parsed.logprobs:
            self.logprobs.extend(self._token_logprobs(chunk))

    def response(self, summary: coordinator_pb2.GenerateSummary) -> dict:
        choice = self._choice(
            "".join(self.text), summary.finish_reason, self._logprobs_field(self.logprobs), delta=False
        )
        return {**self._envelope([choice], chunk=False), "usage": usage(summary)}
