"""Requests on the coordinator: prompt -> token ids -> the pipeline -> streamed text.

The coordinator sends a request's prompt to stage 0 once; after that, every decode step runs around
the ring of stages without it. Sampled tokens reach it on each worker's ``Results`` stream, off the
critical path, and are routed here by request id.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from pomona.errors import PomonaError
from pomona.proto import coordinator_pb2, worker_pb2

from .textstream import TextStream

# A request whose last stage has said nothing for this long has failed (a node died, say).
TOKEN_TIMEOUT_S = 300.0
# A worker's error may be the first sign of a lost node: this long for a recovery to begin.
RECOVERY_NOTICE_S = 3.0
RECOVERY_TIMEOUT_S = 600.0  # re-planning and reloading every shard

# Put in every request's queue when the cluster starts recovering from a lost node.
INTERRUPTED = object()
MAX_TOP_LOGPROBS = 20  # as OpenAI's API; the last stage sends no more than this per token


class RequestError(PomonaError):
    """A request the cluster cannot serve as asked (bad parameters, prompt too long)."""


@dataclass(frozen=True)
class RequestLimits:
    context_length: int
    default_max_tokens: int
    prefill_chunk_tokens: int
    max_batch: int  # requests per decode micro-batch (generation.max_batch)


MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
CHAT_ROLES = ("system", "user", "assistant", "tool")


def validate_sampling(sampling: worker_pb2.SamplingParams) -> None:
    for name in ("temperature", "top_p", "min_p"):
        if not math.isfinite(getattr(sampling, name)):
            raise RequestError(f"{name} must be a finite number, got {getattr(sampling, name)}")
    if sampling.temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0 <= sampling.top_p <= 1:
        raise RequestError(f"top_p must be between 0 and 1, got {sampling.top_p}")
    if sampling.top_k < 0:
        raise RequestError(f"top_k must be >= 0, got {sampling.top_k}")
    if not 0 <= sampling.min_p <= 1:
        raise RequestError(f"min_p must be between 0 and 1, got {sampling.min_p}")
    if not 0 <= sampling.top_logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {sampling.top_logprobs}"
        )


class RequestRouter:
    def __init__(
        self,
        tokenizer,
        limits: RequestLimits,
        send_to_first_stage: Callable[[worker_pb2.StageMessage], Awaitable[None]],
    ):
        self.tokenizer = tokenizer
        self.limits = limits
        self._send = send_to_first_stage
        self._queues: dict[str, asyncio.Queue] = {}
        self._background: set[asyncio.Task] = set()
        self.tokens_produced = 0  # every token of every request, for sharing energy out
        self.energy = None  # an EnergyAccount once the cluster is ready
        # Recovery (coordinator.recovery): interruptions so far, and whether the cluster serves.
        self._interruptions = 0
        self._failures = 0  # fail_all calls: the cluster decided a loss ends its requests
        self._serving = asyncio.Event()
        self._serving.set()
        self._failure = ""
        self.recovers = True  # the cluster recovers from lost nodes (cluster.yaml `recovery`)

    @property
    def active_requests(self) -> int:
        return len(self._queues)

    def dispatch(self, event: worker_pb2.TokenEvent) -> None:
        """Route a worker's token event to its request (events of finished requests are dropped)."""
        queue = self._queues.get(event.request_id)
        if queue is not None:
            if not event.error:
                self.tokens_produced += 1
            queue.put_nowait(event)

    def fail_all(self, reason: str) -> None:
        for request_id, queue in self._queues.items():
            queue.put_nowait(worker_pb2.TokenEvent(request_id=request_id, error=reason))
        self._failure = reason
        self._failures += 1
        self._serving.set()  # requests held for a recovery fail with `reason`

    def interrupt_all(self, reason: str) -> None:
        """Hold every request in flight until `resume` (they replay) or `fail_all`."""
        self._interruptions += 1
        self._failure = ""
        self._serving.clear()
        for queue in self._queues.values():
            queue.put_nowait(INTERRUPTED)

    def resume(self) -> None:
        self._serving.set()

    async def _interrupted_since(self, count: int, failures: int) -> bool:
        """Whether a recovery began after `count` interruptions (waiting a little for it, unless
        the cluster has failed its requests since `failures` instead: no recovery is coming)."""
        if not self.recovers:
            return False
        deadline = time.monotonic() + RECOVERY_NOTICE_S
        while self._interruptions == count and self._failures == failures and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._interruptions != count

    async def _await_recovery(self) -> None:
        try:
            await asyncio.wait_for(self._serving.wait(), RECOVERY_TIMEOUT_S)
        except TimeoutError:
            raise PomonaError(f"the cluster did not recover within {RECOVERY_TIMEOUT_S:.0f} s") from None
        if self._failure:
            raise PomonaError(f"generation failed: {self._failure}")

    def prompt_token_ids(self, request: coordinator_pb2.GenerateRequest) -> list[int]:
        if request.raw:
            if request.messages:
                raise RequestError("a raw request takes `prompt`, not chat `messages`")
            ids = self.tokenizer.encode(request.prompt)
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if not messages:
                messages = [{"role": "user", "content": request.prompt}]
            ids = self.tokenizer.encode_chat(messages)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.limits.context_length:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the model's context holds "
                f"{self.limits.context_length}: shorten the prompt"
            )
        return ids

    async def generate(
        self, request: coordinator_pb2.GenerateRequest
    ) -> AsyncIterator[coordinator_pb2.GenerateChunk]:
        validate_sampling(request.sampling)
        if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in request.stop):
            raise RequestError(
                f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters each"
            )
        if bad := [m.role for m in request.messages if m.role not in CHAT_ROLES]:
            raise RequestError(f"unknown chat role {bad[0]!r}; use one of {', '.join(CHAT_ROLES)}")
        if request.max_tokens < 0:
            raise RequestError(f"max_tokens must be >= 0, got {request.max_tokens}")
        started = time.perf_counter()
        prompt = self.prompt_token_ids(request)
        room = self.limits.context_length - len(prompt)
        max_tokens = min(request.max_tokens or self.limits.default_max_tokens, room)
        eos = [] if request.ignore_eos else list(self.tokenizer.eos_token_ids)
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        stream = TextStream(self.tokenizer.decode, list(request.stop))
        finish_reason = ""
        pipeline_finished = False  # the last stage ended the request (EOS or max tokens)
        first_token_at = last_token_at = 0.0
        cached_prompt_tokens = 0  # from the first token's event (after a replay: the replay's)
        # The energy snapshot runs alongside the prompt's way into the pipeline, not before it.
        energy_start = asyncio.ensure_future(self.energy.snapshot()) if self.energy else None

        def start_message(request_id: str) -> worker_pb2.StageMessage:
            # After a recovery the prompt is replayed with every token produced so far.
            done = list(stream.token_ids)
            start = worker_pb2.StartRequest(
                prompt_token_ids=prompt + done,
                sampling=request.sampling,
                max_tokens=max_tokens - len(done),
                eos_token_ids=eos,
                prefill_chunk_tokens=self.limits.prefill_chunk_tokens,
                max_batch=self.limits.max_batch,
                generated_before=len(done),
            )
            return worker_pb2.StageMessage(request_id=request_id, start=start)

        async def replay() -> None:
            """Wait for the recovery, then start again under a new id (the old one's events,
            from the pipeline that was, are dropped)."""
            nonlocal request_id, queue
            await self._await_recovery()
            del self._queues[request_id]
            request_id, queue = uuid.uuid4().hex, asyncio.Queue()
            self._queues[request_id] = queue
            await self._send(start_message(request_id))

        try:
            interruptions, failures = self._interruptions, self._failures
            try:
                await self._send(start_message(request_id))
            except PomonaError:
                if not await self._interrupted_since(interruptions, failures):
                    raise
                await replay()
            while not finish_reason:
                try:
                    event = await asyncio.wait_for(queue.get(), TOKEN_TIMEOUT_S)
                except TimeoutError:
                    raise PomonaError(
                        f"no token arrived for {TOKEN_TIMEOUT_S:.0f} s: a node may have failed; "
                        "see `pomona status`"
                    ) from None
                if event is INTERRUPTED:
                    interruptions, failures = self._interruptions, self._failures
                    await replay()
                    continue
                if event.error:
                    if not await self._interrupted_since(interruptions, failures):
                        raise PomonaError(f"generation failed: {event.error}")
                    interruptions, failures = self._interruptions, self._failures
                    await replay()
                    continue
                last_token_at = time.perf_counter()
                first_token_at = first_token_at or last_token_at
                cached_prompt_tokens = event.cached_prompt_tokens or cached_prompt_tokens
                pipeline_finished = bool(event.finish_reason)
                text = stream.push(event.token_id, final=pipeline_finished)
                finish_reason = "stop" if stream.stopped else event.finish_reason
                chunk = coordinator_pb2.GenerateChunk(text=text, token_ids=[event.token_id])
                if event.HasField("logprobs"):
                    chunk.logprobs.append(event.logprobs)
                yield chunk
        finally:
            del self._queues[request_id]
            if not pipeline_finished:
                # The pipeline is still generating (stop string, error, client gone): stop it.
                cancel = worker_pb2.StageMessage(request_id=request_id, cancel=worker_pb2.CancelRequest())
                # Not awaited: this also runs when the client is gone and the task is cancelled.
                task = asyncio.ensure_future(self._send(cancel))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        generated = len(stream.token_ids)
        decode_s = last_token_at - first_token_at
        energy_j, energy_source = 0.0, ""
        if energy_start is not None:
            start_snapshot, end_snapshot = await energy_start, await self.energy.snapshot()
            energy_j, energy_source = self.energy.request_energy(start_snapshot, end_snapshot, generated)
        yield coordinator_pb2.GenerateChunk(
            summary=coordinator_pb2.GenerateSummary(
                energy_j=energy_j,
                j_per_token=energy_j / generated if generated else 0.0,
                energy_source=energy_source,
                finish_reason=finish_reason,
                prompt_tokens=len(prompt),
                cached_prompt_tokens=min(cached_prompt_tokens, len(prompt)),
                generated_tokens=generated,
                ttft_s=first_token_at - started,
                decode_tok_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
                token_ids=stream.token_ids,
                text=stream.text,
            )
        )
