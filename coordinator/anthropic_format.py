"""The Anthropic Messages format: `/v1/messages` bodies in, its JSON and SSE events out
(`message_start`, `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`,
`message_delta`, `message_stop`), and Anthropic's error shape (`{"type": "error", "error": ...}`).

Pure functions of the body and the router's chunks, like `coordinator.openai_format`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pomona.proto import coordinator_pb2

from .http_params import (
    ApiError,
    ParsedRequest,
    bad_request,
    boolean,
    max_new_tokens,
    refuse_unsupported,
    require_model,
    sampling,
    stop_strings,
    text_content,
)

ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "rate_limit": "rate_limit_error",
    "overloaded": "overloaded_error",
    "server": "api_error",
}


def parse_messages(body: dict, served: Sequence[str], max_tokens_limit: int) -> ParsedRequest:
    model = require_model(body, served)
    refuse_unsupported(body, ("tools", "tool_choice", "thinking"))
    stop = stop_strings(body, "stop_sequences")
    request = coordinator_pb2.GenerateRequest(
        max_tokens=max_new_tokens(body, ("max_tokens",), max_tokens_limit, required=True),
        sampling=sampling(body, temperature_max=1.0, logprobs=False, top_logprobs=0),
        stop=list(stop),
    )
    system = body.get("system")
    if system is not None:
        request.messages.add(role="system", content=text_content(system, "system"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {role, content}", "messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            hint = "; put the system prompt in the top-level `system` field" if role == "system" else ""
            raise bad_request(f"{where}.role must be user or assistant, not {role!r}{hint}", "messages")
        request.messages.add(role=role, content=text_content(message.get("content", ""), where))
    return ParsedRequest(request, model, boolean(body, "stream"), stop=stop)


def error_body(error: ApiError) -> dict:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(error.kind, "api_error"), "message": error.message},
    }


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class AnthropicAnswer:
    parsed: ParsedRequest
    decode: Callable[[Sequence[int]], str]
    id: str = field(default_factory=lambda: "msg_" + uuid.uuid4().hex)
    text: list[str] = field(default_factory=list)

    def _stop(self, summary: coordinator_pb2.GenerateSummary) -> tuple[str, str | None]:
        if summary.finish_reason == "length":
            return "max_tokens", None
        full = self.decode(list(summary.token_ids))
        found = [(full.find(s), s) for s in self.parsed.stop if s in full]
        if found:
            return "stop_sequence", min(found)[1]
        return "end_turn", None

    def _usage(self, summary: coordinator_pb2.GenerateSummary) -> dict:
        # As Anthropic counts: input_tokens are those not read from the (prompt) cache.
        cached = summary.cached_prompt_tokens
        result = {
            "input_tokens": summary.prompt_tokens - cached,
            "cache_read_input_tokens": cached,
            "output_tokens": summary.generated_tokens,
        }
        if summary.energy_source:
            result.update(
                energy_j=summary.energy_j,
                j_per_token=summary.j_per_token,
                energy_source=summary.energy_source,
            )
        return result

    def _message(self, content: list, usage: dict, stop_reason=None, stop_sequence=None) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.parsed.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    # -- streaming ----------------------------------------------------------------------------

    def stream_head(self, prompt_tokens: int) -> list[bytes]:
        start = self._message([], {"input_tokens": prompt_tokens, "output_tokens": 0})
        return [
            event("message_start", {"type": "message_start", "message": start}),
            event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            event("ping", {"type": "ping"}),
        ]

    def stream_delta(self, chunk: coordinator_pb2.GenerateChunk) -> list[bytes]:
        if not chunk.text:
            return []
        self.text.append(chunk.text)
        delta = {"type": "text_delta", "text": chunk.text}
        return [event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})]

    def stream_tail(self, summary: coordinator_pb2.GenerateSummary) -> list[bytes]:
        reason, sequence = self._stop(summary)
        return [
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": self._usage(summary),
                },
            ),
            event("message_stop", {"type": "message_stop"}),
        ]

    def stream_error(self, error: ApiError) -> list[bytes]:
        return [event("error", error_body(error))]

    # -- one response -------------------------------------------------------------------------

    def add(self, chunk: coordinator_pb2.GenerateChunk) -> None:
        self.text.append(chunk.text)

    def response(self, summary: coordinator_pb2.GenerateSummary) -> dict:
        reason, sequence = self._stop(summary)
        content = [{"type": "text", "text": "".join(self.text)}]
        return self._message(content, self._usage(summary), reason, sequence)
