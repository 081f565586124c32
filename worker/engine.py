"""The stage engine: the thread of a worker that runs its stage in MLX, and the per-request state
machine of the data plane.

Every message of the data plane (``StageMessage``) and every control job (load, release) becomes a
job on one queue, run in order on the engine's thread, so per-request order is the order of
arrival on each stream. Expert requests from other nodes are served between jobs (ahead of queued
ones) and while this node's own dispatches wait. A node that holds experts only runs them on the
gRPC handler thread instead (no hand-off); ``mlx_lock`` keeps MLX work on one thread at a time.

A broken link to the next stage fails every request here at once, naming the node; a request sent
while it is down fails at its first send.

A request's life on the ring of stages:
  stage 0 gets ``start`` (with the prompt) from the coordinator -> passes ``start`` on -> prefill in
  chunks (each chunk a job, so other requests' decode steps interleave) -> ``activations`` flow
  stage to stage -> the last stage samples and sends ``next_token`` to stage 0 -> ... -> the last
  stage sees EOS or max tokens, or stage 0 sees a cancel -> ``end`` travels the ring once and every
  stage frees the request's caches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from pomona.proto import worker_pb2

from .dispatch import Dispatcher
from .experts import ExpertStats
from .link import Link, LinkBroken
from .sampling import Sampler, SamplingConfig, TokenLogprobs
from .stage import StageModel
from .validate import BadInput, ModelLimits, check_hidden, check_start, check_token, model_limits
from .wire import decode_tensor, encode_tensor

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    caches: list
    max_tokens: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    prompt: list[int] = field(default_factory=list)  # stage 0 only
    prefill_chunk_tokens: int = 256
    position: int = 0  # stage 0: prompt tokens already sent into the pipeline
    sampler: Sampler | None = None  # last stage only
    generated: int = 0
    cancelled: bool = False


class ResultHub:
    """Fans the token events of this worker out to every subscribed coordinator stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[queue.SimpleQueue] = []

    def subscribe(self) -> queue.SimpleQueue:
        subscriber: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: queue.SimpleQueue) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def publish(self, event: worker_pb2.TokenEvent) -> None:
        with self._lock:
            for subscriber in self._subscribers:
                subscriber.put(event)


class StageEngine:
    def __init__(self, max_message_bytes: int = 64 * 2**20) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.max_message_bytes = max_message_bytes
        self.limits: ModelLimits | None = None  # what the loaded stage accepts (validate.py)
        # Request ids in use here, claimed by the gRPC handler that receives a `start` (so a
        # duplicate is refused before it reaches the engine), freed when the request ends.
        self._claimed: set[str] = set()
        self._claim_lock = threading.Lock()
        self.stage: StageModel | None = None
        self.stage_index = 0
        self.stage_count = 1
        self.requests: dict[str, RequestState] = {}
        self.results = ResultHub()
        self.next_link: Link | None = None
        # Expert parallelism: this node's dispatches, and requests for the experts held here.
        self.expert_stats = ExpertStats()
        # Measured compute, for the scheduler's predicted-vs-measured view (`pomona status`).
        self.busy_s = self.decode_busy_s = 0.0
        self.decode_steps = 0
        self.dispatcher = Dispatcher(self.expert_stats)
        self.experts_only = False
        # Held by whichever thread runs MLX: the engine thread for every job, and, on a node that
        # holds experts only, the gRPC handler threads that compute expert requests directly.
        self.mlx_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()

    # -- running jobs on the engine thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            with self.mlx_lock:
                # Expert requests go first: a stage node serves them between its own jobs, never
                # behind queued prefill chunks. (Those served while a step waits on its own
                # dispatches are inside that step's busy time already.)
                started = time.perf_counter()
                if self.dispatcher.serve_pending():
                    self.busy_s += time.perf_counter() - started
                try:
                    result = job()
                except BaseException as error:  # reported to whoever waits on the job
                    if future is None:
                        log.exception("engine job failed")
                    else:
                        future.set_exception(error)
                else:
                    if future is not None:
                        future.set_result(result)

    def call(self, job: Callable[[], Any]) -> Future:
        """Run ``job`` on the engine thread; the future holds its result."""
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def submit_expert(self, request: worker_pb2.ExpertRequest) -> Future:
        """An expert request from a gRPC handler thread; the future holds the reply. A stage node
        serves it on the engine thread (its MLX work is there), at the next job boundary or
        while it waits for its own dispatches."""
        future: Future = Future()
        self.dispatcher.submit_request(request, future.set_result)
        self._jobs.put((lambda: None, None))  # wakes an idle engine, which serves it at once
        return future

    def compute_expert_here(self, request: worker_pb2.ExpertRequest) -> worker_pb2.ExpertReply:
        """An expert-only node computes on the calling gRPC handler thread: no hand-off to the
        engine and back. The lock keeps MLX work on one thread at a time."""
        with self.mlx_lock:
            started = time.perf_counter()
            reply = self.dispatcher.compute(request)
            self.busy_s += time.perf_counter() - started  # measured busy time, for energy
            return reply

    def submit(self, message: worker_pb2.StageMessage) -> None:
        """Queue a data-plane message (called from gRPC handler threads)."""
        self._jobs.put((lambda: self._handle(message), None))

    # -- configuration (engine thread) ---------------------------------------------------------

    def claim(self, request_id: str) -> bool:
        """Reserve ``request_id`` for a new request; False if a request here already has it."""
        with self._claim_lock:
            if request_id in self._claimed:
                return False
            self._claimed.add(request_id)
            return True

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        with self._claim_lock:
            self._claimed.discard(request_id)

    def install(self, stage: StageModel | None, index: int, count: int, next_link) -> None:
        self.stage, self.stage_index, self.stage_count = stage, index, count
        self.limits = model_limits(stage.model, self.max_message_bytes) if stage is not None else None
        self.next_link = next_link if count > 1 else None
        self.experts_only = stage is None and self.dispatcher.host is not None

    def on_next_link_broken(self, reason: str) -> None:
        """The next stage is gone: every request here needs it, so fail them all now (engine
        thread), naming the node; later ones fail at their first send until it is back."""
        for request_id in list(self.requests):
            self._forget(request_id)
            self.results.publish(
                worker_pb2.TokenEvent(request_id=request_id, error=f"next stage {reason}")
            )

    def release(self) -> None:
        self.requests.clear()
        self.expert_stats.fold_counters()
        with self._claim_lock:
            self._claimed.clear()
        self.stage = None
        if self.next_link is not None:
            self.next_link.close()
        self.next_link = None
        self.experts_only = False
        self.dispatcher.host = None
        self.dispatcher.close()
        mx.clear_cache()

    def parameter_bytes(self) -> int:
        total = self.stage.parameter_bytes if self.stage is not None else 0
        if self.dispatcher.host is not None:
            for module, _ in self.dispatcher.host.modules.values():
                total += sum(v.nbytes for _, v in tree_flatten(module.parameters()))
        return total

    def cache_bytes(self) -> int:
        return sum(
            getattr(cache, "nbytes", 0) for state in self.requests.values() for cache in state.caches
        )

    # -- the data plane (engine thread) ----------------------------------------------------------

    @property
    def _is_last(self) -> bool:
        return self.stage_index == self.stage_count - 1

    def _forward(self, message: worker_pb2.StageMessage) -> None:
        if self.next_link is None:  # a single stage is its own next stage
            self.submit(message)
        else:
            try:
                self.next_link.send(message)
            except LinkBroken as error:
                raise LinkBroken(f"next stage {error}") from None

    def _handle(self, message: worker_pb2.StageMessage) -> None:
        request_id = message.request_id
        kind = message.WhichOneof("body")
        if self.stage is None:
            self._fail(request_id, "this worker has no shard loaded")
            return
        self._guarded(request_id, lambda: getattr(self, f"_on_{kind}")(request_id, getattr(message, kind)))

    def _guarded(self, request_id: str, work: Callable[[], None]) -> None:
        """Run a request's work; a failure fails that request alone (reported, caches freed)."""
        try:
            work()
        except (LinkBroken, BadInput) as error:  # one line: the message names the node or field
            log.error("request %s failed on stage %d: %s", request_id, self.stage_index, error)
            self._fail(request_id, f"stage {self.stage_index}: {error}")
        except Exception as error:
            log.exception("request %s failed on stage %d", request_id, self.stage_index)
            self._fail(request_id, f"stage {self.stage_index}: {type(error).__name__}: {error}")

    def _fail(self, request_id: str, reason: str) -> None:
        self.results.publish(worker_pb2.TokenEvent(request_id=request_id, error=reason))
        if request_id in self.requests:
            self._end(request_id, origin=self.stage_index)
        else:
            self._forget(request_id)  # refused before it started: free its claim

    def _on_start(self, request_id: str, start: worker_pb2.StartRequest) -> None:
        check_start(start, self.limits, self.stage_index == 0)
        state = RequestState(
            caches=self.stage.new_caches(),
            max_tokens=start.max_tokens,
            eos_token_ids=frozenset(start.eos_token_ids),
            prefill_chunk_tokens=max(1, start.prefill_chunk_tokens or 256),
        )
        if self._is_last:
            sampling = start.sampling
            state.sampler = Sampler(
                SamplingConfig(
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    min_p=sampling.min_p,
                    seed=sampling.seed if sampling.HasField("seed") else None,
                    logprobs=sampling.logprobs,
                    top_logprobs=sampling.top_logprobs,
                ),
                position=start.generated_before,
            )
        self.requests[request_id] = state
        if self.stage_index == 0:
            state.prompt = list(start.prompt_token_ids)
            if not state.prompt:
                raise ValueError("empty prompt")
        if not self._is_last:
            onward = worker_pb2.StartRequest()
            onward.CopyFrom(start)
            del onward.prompt_token_ids[:]
            self._forward(worker_pb2.StageMessage(request_id=request_id, start=onward))
        if self.stage_index == 0:
            self._prefill_chunk(request_id)

    def _prefill_chunk(self, request_id: str) -> None:
        """Stage 0: push the next chunk of the prompt into the pipeline.

        Like mlx-lm's ``generate_step``, all but the last prompt token go in chunks; the last token
        goes alone and the last stage samples after it.
        """
        state = self.requests.get(request_id)
        if state is None:
            return
        if state.cancelled:
            self._end(request_id, origin=self.stage_index)
            return
        remaining = len(state.prompt) - state.position
        if remaining > 1:
            count = min(state.prefill_chunk_tokens, remaining - 1)
            sample = False
        else:
            count, sample = remaining, True
        ids = state.prompt[state.position : state.position + count]
        state.position += count
        self._step(request_id, state, mx.array([ids], dtype=mx.int32), sample)
        if not sample:  # requeue, so that other requests' steps run between chunks
            next_chunk = lambda: self._guarded(request_id, lambda: self._prefill_chunk(request_id))  # noqa: E731
            self._jobs.put((next_chunk, None))

    def _step(self, request_id: str, state: RequestState, inputs: mx.array, sample: bool) -> None:
        started = time.perf_counter()
        hidden = self.stage.forward(inputs, state.caches)  # [1, L, D]
        if not self._is_last:
            encoded = encode_tensor(hidden)  # evaluates: the step's compute ends here
            self._count_busy(started, inputs.shape[1] == 1)
            activations = worker_pb2.Activations(hidden=encoded, sample=sample)
            self._forward(worker_pb2.StageMessage(request_id=request_id, activations=activations))
        elif sample:
            logits = self.stage.logits(hidden)
            token = state.sampler(logits)
            logprobs = state.sampler.report(logits, token)
            self._count_busy(started, inputs.shape[1] == 1)
            self._emit_token(request_id, state, token, logprobs)
        else:
            mx.eval(hidden)  # a prefill chunk: only the caches matter
            self._count_busy(started, False)

    def _count_busy(self, started: float, decode: bool) -> None:
        elapsed = time.perf_counter() - started
        self.busy_s += elapsed
        if decode:
            self.decode_busy_s += elapsed
            self.decode_steps += 1

    def _on_activations(self, request_id: str, activations: worker_pb2.Activations) -> None:
        state = self.requests.get(request_id)
        if state is None:
            return  # the request ended (failed or cancelled) while this was in flight
        if self.stage.is_first:
            raise BadInput("the first stage takes token ids, not hidden states")
        check_hidden(activations.hidden, self.limits.hidden_size, state.prefill_chunk_tokens)
        self._step(request_id, state, decode_tensor(activations.hidden), activations.sample)

    def _emit_token(
        self, request_id: str, state: RequestState, token: int, logprobs: TokenLogprobs | None = None
    ) -> None:
        state.generated += 1
        if token in state.eos_token_ids:
            finish = "stop"
        elif state.generated >= state.max_tokens:
            finish = "length"
        else:
            finish = ""
        if finish:
            self._end(request_id, origin=self.stage_index)
        else:
            next_token = worker_pb2.NextToken(token_id=token)
            self._forward(worker_pb2.StageMessage(request_id=request_id, next_token=next_token))
        # Stage 0 already has the token; the coordinator's copy is off the critical path.
        event = worker_pb2.TokenEvent(request_id=request_id, token_id=token, finish_reason=finish)
        if logprobs is not None:
            event.logprobs.logprob = logprobs.logprob
            event.logprobs.top_token_ids.extend(token_id for token_id, _ in logprobs.top)
            event.logprobs.top_logprobs.extend(value for _, value in logprobs.top)
        self.results.publish(event)

    def _on_next_token(self, request_id: str, next_token: worker_pb2.NextToken) -> None:
        state = self.requests.get(request_id)
        if state is None:
            return
        if state.cancelled:
            self._end(request_id, origin=self.stage_index)
            return
        if self.stage_index != 0:
            raise BadInput("only the first stage takes the next token")
        check_token(next_token.token_id, self.limits, "next token id")
        self._step(request_id, state, mx.array([[next_token.token_id]], dtype=mx.int32), True)

    def _end(self, request_id: str, origin: int) -> None:
        self._forget(request_id)
        next_index = (self.stage_index + 1) % self.stage_count
        if next_index != origin:
            end = worker_pb2.EndRequest(origin=origin)
            try:
                self._forward(worker_pb2.StageMessage(request_id=request_id, end=end))
            except LinkBroken:
                pass  # the next stage is gone, and with it the request's caches there

    def _on_end(self, request_id: str, end: worker_pb2.EndRequest) -> None:
        self._end(request_id, end.origin)

    def _on_cancel(self, request_id: str, cancel: worker_pb2.CancelRequest) -> None:
        state = self.requests.get(request_id)
        if state is not None:
            state.cancelled = True
