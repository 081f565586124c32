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
  chunks of all but the last prompt token (each chunk a job, so decode steps interleave) ->
  ``activations`` flow stage to stage -> the request joins a decode micro-batch with its last
  prompt token -> each ``decode_step`` advances every request of the micro-batch by one token in
  one batched forward per stage (``worker.batching``) -> the last stage samples a token per row and
  sends ``decode_tokens`` to stage 0, which starts the micro-batch's next step with the requests
  that go on and those that joined meanwhile -> the last stage sees EOS or max tokens, or stage 0
  sees a cancel -> ``end`` travels the ring once and every stage frees the request's caches (its
  row leaves the micro-batch).

Continuous batching: stage 0 keeps one micro-batch per stage, so that while one is computed on a
stage the others are on the other stages (every stage busy); a request joins the smallest. Each
request's tokens are those it gets alone: greedy, and seeded sampling (its key is a function of
its seed and position only).
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

from .batching import DEFAULT_MAX_BATCH, DecodeScheduler, MicroBatch, can_batch, prefill_caches
from .dispatch import Dispatcher
from .experts import ExpertStats
from .link import Link, LinkBroken
from .prompt_cache import StagePromptCache, keepable
from .sampling import Sampler, SamplingConfig, TokenLogprobs, sample_rows
from .stage import StageModel
from .validate import (
    BadInput,
    ModelLimits,
    check_decode_step,
    check_hidden,
    check_prefill_rows,
    check_start,
    check_token,
    model_limits,
)
from .wire import decode_tensor, encode_tensor

log = logging.getLogger(__name__)

@dataclass
class RequestState:
    caches: list | None  # its own caches; None once a batching micro-batch holds its rows
    max_tokens: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    prompt: list[int] = field(default_factory=list)  # stage 0 only
    prefill_chunk_tokens: int = 256
    position: int = 0  # stage 0: prompt tokens already sent into the pipeline
    sampler: Sampler | None = None  # last stage only
    generated: int = 0
    cancelled: bool = False
    batch: int | None = None  # the decode micro-batch it joined (after its prefill)
    next_input: int = 0  # stage 0: the token its next decode step takes
    fed: list[int] = field(default_factory=list)  # stage 0: generated tokens fed back so far
    keep: bool = False  # keep its caches in the prompt cache when it finishes
    cached_tokens: int = 0  # prompt tokens it took from the prompt cache


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

    def publish(self, *events: worker_pb2.TokenEvent) -> None:
        """Events that travel together (a decode step's tokens) in one message."""
        with self._lock:
            for subscriber in self._subscribers:
                subscriber.put(events)


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
        self.batch_steps = self.batch_rows = 0  # decode steps of any size, and their rows
        # Continuous batching: each micro-batch's caches here; stage 0 also schedules them.
        self.batching = False  # this stage's caches have a batch form (worker.batching)
        self.batches: dict[int, MicroBatch] = {}
        self.scheduler: DecodeScheduler | None = None  # stage 0 only
        self.prefilling: list[str] = []  # stage 0: requests whose prompts wait for prefill
        self._prefill_queued = False
        self.dispatcher = Dispatcher(self.expert_stats)
        self.experts_only = False
        # The prompt cache: finished requests' caches kept here; stage 0 also decides.
        self.prompt_cache = StagePromptCache()
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
        state = self.requests.pop(request_id, None)
        with self._claim_lock:
            self._claimed.discard(request_id)
        if state is None or state.batch is None:
            return
        batch = self.batches.get(state.batch)
        if batch is not None:
            batch.remove(request_id)  # its row leaves the micro-batch's caches
        if self.scheduler is not None:
            self.scheduler.forget(request_id, state.batch)

    def install(
        self,
        stage: StageModel | None,
        index: int,
        count: int,
        next_link,
        micro_batches: int = 0,
        prompt_cache_tokens: int = 0,
    ) -> None:
        self.stage, self.stage_index, self.stage_count = stage, index, count
        self.limits = model_limits(stage.model, self.max_message_bytes) if stage is not None else None
        self.next_link = next_link if count > 1 else None
        self.experts_only = stage is None and self.dispatcher.host is not None
        self.batching = stage is not None and can_batch(stage.new_caches())
        self.batches.clear()
        # By default one micro-batch per stage: each stage computes one while the others travel.
        first = stage is not None and index == 0
        self.scheduler = DecodeScheduler(micro_batches or count) if first else None
        if first:
            self.prompt_cache.reset(prompt_cache_tokens, stage.adapter.model_caches())
        else:
            self.prompt_cache.reset()

    def on_next_link_broken(self, reason: str) -> None:
        """The next stage is gone: every request here needs it, so fail them all now (engine
        thread), naming the node; later ones fail at their first send until it is back."""
        for request_id in list(self.requests):
            self._forget(request_id)
            self.results.publish(
                worker_pb2.TokenEvent(request_id=request_id, error=f"next stage {reason}")
            )
        self.batches.clear()
        if self.scheduler is not None:
            self.scheduler.clear()
        self.prompt_cache.forget_all()

    def release(self) -> None:
        self.requests.clear()
        self.batches.clear()
        self.scheduler = None
        self.prefilling = []
        self.prompt_cache.reset()
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
        own = (state.caches or [] for state in self.requests.values())
        batched = (batch.caches or [] for batch in self.batches.values())
        return sum(getattr(cache, "nbytes", 0) for caches in (*own, *batched) for cache in caches)

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
        body = getattr(message, kind)
        batched = kind in ("decode_step", "decode_tokens", "prefill_rows")
        if self.stage is None:
            for each in list(body.request_ids) if batched else [request_id]:
                self._fail(each, "this worker has no shard loaded")
            return
        handler = getattr(self, f"_on_{kind}")
        if batched:
            self._guarded_batch(list(body.request_ids), lambda: handler(body))
        else:
            self._guarded(request_id, lambda: handler(request_id, body))
        if self.scheduler is not None:
            self._kick_idle()

    def _guarded(self, request_id: str, work: Callable[[], None]) -> None:
        """Run a request's work; a failure fails that request alone (reported, caches freed)."""
        self._guarded_batch([request_id], work)

    def _guarded_batch(self, request_ids: list[str], work: Callable[[], None]) -> None:
        """Run the work of these requests (one, or a decode step's rows); a failure fails each of
        them (reported, caches freed) and no other."""
        try:
            work()
            return
        except (LinkBroken, BadInput) as error:  # one line: the message names the node or field
            log.error("request(s) %s failed on stage %d: %s", ", ".join(request_ids), self.stage_index, error)
            reason = f"stage {self.stage_index}: {error}"
        except Exception as error:
            log.exception("request(s) %s failed on stage %d", ", ".join(request_ids), self.stage_index)
            reason = f"stage {self.stage_index}: {type(error).__name__}: {error}"
        for request_id in request_ids:
            self._fail(request_id, reason)

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
            self.scheduler.max_batch = max(1, start.max_batch or DEFAULT_MAX_BATCH)
            self.prompt_cache.plan(start, state.prompt)
        self._apply_prompt_cache(state, start)
        if not self._is_last:
            onward = worker_pb2.StartRequest()
            onward.CopyFrom(start)
            del onward.prompt_token_ids[:]
            self._forward(worker_pb2.StageMessage(request_id=request_id, start=onward))
        if self.stage_index == 0:
            if state.position >= len(state.prompt) - 1:
                self._join(request_id, state)  # nothing to prefill: the token goes in a decode step
            else:
                self.prefilling.append(request_id)
                self._queue_prefill()

    # -- the prompt cache (worker.prompt_cache) ----------------------------------------------------

    def _apply_prompt_cache(self, state: RequestState, start: worker_pb2.StartRequest) -> None:
        """Every stage: drop the evicted entries, then start from the reused entry's caches."""
        try:
            reused = self.prompt_cache.apply(start)
        except LookupError as error:
            problem = f"{error}; the stages' prompt caches disagree (pomona down, then pomona up)"
            raise BadInput(problem) from None
        if reused is not None:
            state.caches = reused
            state.position = state.cached_tokens = start.reuse_tokens
        state.keep = start.keep and keepable(state.caches)

    def _keep(self, request_id: str) -> None:
        """A request that finished keeps its caches (this stage's layers) in the prompt cache;
        stage 0 indexes them by the tokens they hold, or tells the stages to drop them (e.g. a
        request cancelled here while the last stage finished it: kept there, unknown here)."""
        state = self.requests.get(request_id)
        caches = None
        if state is not None and state.keep:
            caches = state.caches
            batch = self.batches.get(state.batch) if state.batch is not None else None
            if caches is None and batch is not None and batch.batched and request_id in batch.ids:
                row = batch.ids.index(request_id)
                caches = [cache.extract(row) for cache in batch.caches]
        tokens = state.prompt + state.fed if state is not None else None
        self.prompt_cache.finished(request_id, caches, tokens)

    # -- prefill ---------------------------------------------------------------------------------
    #
    # Like mlx-lm's ``generate_step``, all but the last prompt token are prefilled; the last token
    # goes in the request's first decode step, whose logits give its first token. New prompts that
    # fit one chunk are prefilled together (left-padded, one forward per stage); a longer prompt
    # goes alone, a chunk per turn. Each turn is a job, so decode steps run between them.

    def _queue_prefill(self) -> None:
        if not self._prefill_queued:
            self._prefill_queued = True
            self._jobs.put((self._prefill_turn, None))

    def _fits_one_chunk(self, state: RequestState) -> bool:
        return state.position == 0 and len(state.prompt) - 1 <= state.prefill_chunk_tokens

    def _prefill_turn(self) -> None:
        """Stage 0: one prefill forward: the waiting prompts that fit one chunk together (when the
        first waiting prompt does), else the next chunk of the first."""
        self._prefill_queued = False
        waiting = [r for r in self.prefilling if r in self.requests]
        self.prefilling = []
        for request_id in list(waiting):
            if self.requests[request_id].cancelled:
                waiting.remove(request_id)
                self._end(request_id, origin=self.stage_index)
        if waiting:
            head = waiting[0]
            fitting = [r for r in waiting if self._fits_one_chunk(self.requests[r])]
            together = fitting[: self.scheduler.max_batch]
            if head in together and len(together) > 1:
                self._guarded_batch(together, lambda: self._prefill_together(together))
                waiting = [r for r in waiting if r not in together]
            else:  # a long prompt, or one alone: as a single request's chunks
                self._guarded(head, lambda: self._prefill_chunk(head))
                waiting = waiting[1:] + [head]  # its next chunk after the others' turn
            self.prefilling = [r for r in waiting if not self._prefilled(r)] + self.prefilling
        if self.prefilling:
            self._queue_prefill()
        if self.scheduler is not None:  # None once the shard is released
            self._kick_idle()

    def _prefilled(self, request_id: str) -> bool:
        state = self.requests.get(request_id)
        return state is None or state.batch is not None

    def _prefill_chunk(self, request_id: str) -> None:
        """Stage 0: the next chunk of one prompt; the request joins a micro-batch after its last."""
        state = self.requests[request_id]
        count = min(state.prefill_chunk_tokens, len(state.prompt) - 1 - state.position)
        ids = state.prompt[state.position : state.position + count]
        state.position += count
        self._prefill_step(request_id, state, mx.array([ids], dtype=mx.int32))
        if state.position == len(state.prompt) - 1:
            self._join(request_id, state)

    def _prefill_together(self, request_ids: list[str]) -> None:
        """Stage 0: the prompts (each fits one chunk) of ``request_ids`` in one forward."""
        prompts = [self.requests[r].prompt[:-1] for r in request_ids]
        width = max(len(prompt) for prompt in prompts)
        padded = [[0] * (width - len(prompt)) + prompt for prompt in prompts]
        self._prefill_rows(request_ids, [len(p) for p in prompts], mx.array(padded, dtype=mx.int32))
        for request_id, prompt in zip(request_ids, prompts):
            state = self.requests[request_id]
            state.position = len(prompt)
            self._join(request_id, state)

    def _prefill_rows(self, request_ids: list[str], lengths: list[int], inputs: mx.array) -> None:
        """Left-padded prompts ``[rows, tokens(, D)]`` through this stage in one forward; each row's
        caches become its request's own (a stage without batch caches runs them one by one)."""
        started = time.perf_counter()
        states = [self.requests.get(request_id) for request_id in request_ids]
        if any(state is None or state.caches is None or state.caches[0].offset for state in states):
            raise BadInput("prompts prefilled together must belong to new requests known here")
        width = inputs.shape[1]
        padding = [width - length for length in lengths]
        if self.batching:
            caches = prefill_caches(states[0].caches, padding)
            hidden = self.stage.forward(inputs, caches)
            for i, state in enumerate(states):
                state.caches = [cache.extract(i) for cache in caches]
        else:
            rows = [
                self.stage.forward(inputs[i : i + 1, padding[i] :], state.caches)
                for i, state in enumerate(states)
            ]
            padded_rows = [mx.pad(row, [(0, 0), (pad, 0), (0, 0)]) for row, pad in zip(rows, padding)]
            hidden = mx.concatenate(padded_rows)
        if self._is_last:
            mx.eval(hidden, [(c.keys, c.values) for state in states for c in state.caches])
            self._count_busy(started)
            return
        encoded = encode_tensor(hidden)  # evaluates: the step's compute ends here
        self._count_busy(started)
        rows_message = worker_pb2.PrefillRows(request_ids=request_ids, lengths=lengths, hidden=encoded)
        self._forward(worker_pb2.StageMessage(request_id="prefill", prefill_rows=rows_message))

    def _on_prefill_rows(self, rows: worker_pb2.PrefillRows) -> None:
        self._check_takes_hidden()
        check_prefill_rows(rows, self.limits.hidden_size, self.limits.max_tokens_per_message)
        lengths = dict(zip(rows.request_ids, rows.lengths))
        ids, hidden = self._known_rows(list(rows.request_ids), decode_tensor(rows.hidden))
        if ids:
            self._prefill_rows(ids, [lengths[request_id] for request_id in ids], hidden)

    def _prefill_step(self, request_id: str, state: RequestState, inputs: mx.array) -> None:
        started = time.perf_counter()
        hidden = self.stage.forward(inputs, state.caches)  # [1, L, D]
        if self._is_last:
            mx.eval(hidden)  # a prefill chunk: only the caches matter
            self._count_busy(started)
            return
        encoded = encode_tensor(hidden)  # evaluates: the step's compute ends here
        self._count_busy(started)
        activations = worker_pb2.Activations(hidden=encoded)
        self._forward(worker_pb2.StageMessage(request_id=request_id, activations=activations))

    def _on_activations(self, request_id: str, activations: worker_pb2.Activations) -> None:
        state = self.requests.get(request_id)
        if state is None:
            return  # the request ended (failed or cancelled) while this was in flight
        self._check_takes_hidden()
        if state.caches is None:
            raise BadInput(f"request {request_id!r} is decoding; it takes no more prefill chunks")
        check_hidden(activations.hidden, self.limits.hidden_size, state.prefill_chunk_tokens)
        self._prefill_step(request_id, state, decode_tensor(activations.hidden))

    def _check_takes_hidden(self) -> None:
        if self.stage.is_first:
            raise BadInput("the first stage takes token ids, not hidden states")

    def _known_rows(self, request_ids: list[str], rows: mx.array) -> tuple[list[str], mx.array]:
        """The requests of a several-request message still known here, and their rows of
        ``rows``; the others ended here already (their ``end`` is on its way around the ring)."""
        known = [i for i, request_id in enumerate(request_ids) if request_id in self.requests]
        if len(known) == len(request_ids):
            return request_ids, rows
        kept = rows[mx.array(known, dtype=mx.int32)] if known else rows[:0]
        return [request_ids[i] for i in known], kept

    def _count_busy(self, started: float, rows: int = 0) -> None:
        elapsed = time.perf_counter() - started
        self.busy_s += elapsed
        if rows:
            self.batch_steps += 1
            self.batch_rows += rows
        if rows == 1:  # the single-stream step the scheduler predicts
            self.decode_busy_s += elapsed
            self.decode_steps += 1

    # -- decode micro-batches (continuous batching) ----------------------------------------------

    def _join(self, request_id: str, state: RequestState) -> None:
        """Stage 0: a prefilled request joins the micro-batch with the fewest requests; its last
        prompt token goes in that micro-batch's next step."""
        state.position = len(state.prompt)
        state.next_input = state.prompt[-1]
        state.batch = self.scheduler.join(request_id)

    def _kick_idle(self) -> None:
        """Stage 0: start the next step of every micro-batch that is not on the ring and has
        requests (called after each job, so that a step starts as soon as it can)."""
        for index in self.scheduler.idle():
            rows = self.scheduler.rows(index)
            self._guarded_batch(rows, lambda index=index: self._start_step(index))

    def _start_step(self, index: int) -> None:
        for request_id in self.scheduler.rows(index):
            if self.requests[request_id].cancelled:
                self._end(request_id, origin=self.stage_index)  # leaves it (``_forget``)
        started = self.scheduler.start(index)
        if started is None:
            return
        step, rows = started
        inputs = mx.array([[self.requests[r].next_input] for r in rows], dtype=mx.int32)
        self._decode_step(index, step, rows, inputs)

    def _take_caches(self, request_id: str) -> list:
        """A joining request's own prefilled caches, handed over to its micro-batch."""
        state = self.requests[request_id]
        caches, state.caches = state.caches, None
        if caches is None:
            raise BadInput(f"request {request_id!r} is already in a micro-batch")
        return caches

    def _decode_step(self, index: int, step: int, request_ids: list[str], inputs: mx.array) -> None:
        """One step of micro-batch ``index``: ``inputs`` (token ids ``[rows, 1]`` or hidden states
        ``[rows, 1, D]``), one row per request, through this stage's layers in one forward."""
        request_ids, inputs = self._known_rows(request_ids, inputs)
        if not request_ids:
            if self._is_last:
                self._send_tokens(index, step, [], [])
            return
        started = time.perf_counter()
        try:
            hidden = self._batch_forward(index, request_ids, inputs)
        except Exception:
            self.batches.pop(index, None)  # its caches may be half updated: every row fails
            raise
        if not self._is_last:
            encoded = encode_tensor(hidden)  # evaluates: the step's compute ends here
            self._count_busy(started, len(request_ids))
            onward = worker_pb2.DecodeStep(batch=index, step=step, request_ids=request_ids, hidden=encoded)
            self._forward(worker_pb2.StageMessage(request_id=f"batch-{index}", decode_step=onward))
            return
        logits = self.stage.row_logits(hidden)  # [rows, vocab]
        states = [self.requests[request_id] for request_id in request_ids]
        tokens = sample_rows([state.sampler for state in states], logits)
        reports = [state.sampler.report(logits[i], tokens[i]) for i, state in enumerate(states)]
        self._count_busy(started, len(request_ids))
        going, going_tokens, events = [], [], []
        for request_id, state, token, logprobs in zip(request_ids, states, tokens, reports):
            event = self._token_event(request_id, state, token, logprobs)
            events.append(event)
            if not event.finish_reason:
                going.append(request_id)
                going_tokens.append(token)
        self._send_tokens(index, step, going, going_tokens)
        # Stage 0 has the tokens; the coordinator's copy, one message per step, is off the
        # critical path.
        self.results.publish(*events)

    def _batch_forward(self, index: int, request_ids: list[str], inputs: mx.array) -> mx.array:
        batch = self.batches.get(index)
        if batch is None:
            batch = self.batches[index] = MicroBatch(self.batching)
        batch.sync(request_ids, self._take_caches)
        for request_id in request_ids:
            self.requests[request_id].batch = index
        if batch.batched:
            return self.stage.forward(inputs, batch.caches)  # [rows, 1, D]
        # This stage's caches have no batch form: the same step, one request at a time.
        rows = [
            self.stage.forward(inputs[i : i + 1], self.requests[request_id].caches)
            for i, request_id in enumerate(request_ids)
        ]
        return mx.concatenate(rows, axis=0)

    def _send_tokens(self, index: int, step: int, request_ids: list[str], tokens: list[int]) -> None:
        """Last stage -> stage 0: the step's tokens of the requests that go on (the ended ones'
        ``end`` messages went first)."""
        message = worker_pb2.DecodeTokens(batch=index, step=step, request_ids=request_ids, token_ids=tokens)
        self._forward(worker_pb2.StageMessage(request_id=f"batch-{index}", decode_tokens=message))

    def _on_decode_step(self, step: worker_pb2.DecodeStep) -> None:
        self._check_takes_hidden()
        check_decode_step(step, self.limits.hidden_size)
        self._decode_step(step.batch, step.step, list(step.request_ids), decode_tensor(step.hidden))

    def _on_decode_tokens(self, message: worker_pb2.DecodeTokens) -> None:
        if self.stage_index != 0:
            raise BadInput("only the first stage takes a decode step's tokens")
        slots = len(self.scheduler.slots)
        if not 0 <= message.batch < slots or len(message.token_ids) != len(message.request_ids):
            raise BadInput(f"decode tokens for micro-batch {message.batch} do not match its rows")
        for token in message.token_ids:
            check_token(token, self.limits, "next token id")
        going = [(r, t) for r, t in zip(message.request_ids, message.token_ids) if r in self.requests]
        if not self.scheduler.tokens_back(message.batch, message.step, [r for r, _ in going]):
            return  # a step whose rows all ended meanwhile: its micro-batch went on without it
        for request_id, token in going:
            state = self.requests[request_id]
            state.next_input = token
            if state.keep:
                state.fed.append(token)
        # The next step starts after this job (``_kick_idle``), with the requests that joined.

    def _token_event(
        self, request_id: str, state: RequestState, token: int, logprobs: TokenLogprobs | None
    ) -> worker_pb2.TokenEvent:
        """A sampled token's event for the coordinator; a request that ends with it ends here."""
        state.generated += 1
        cached = state.cached_tokens if state.generated == 1 else 0
        if token in state.eos_token_ids:
            finish = "stop"
        elif state.generated >= state.max_tokens:
            finish = "length"
        else:
            finish = ""
        if finish:
            self._end(request_id, origin=self.stage_index, finished=True)
        event = worker_pb2.TokenEvent(
            request_id=request_id, token_id=token, finish_reason=finish, cached_prompt_tokens=cached
        )
        if logprobs is not None:
            event.logprobs.logprob = logprobs.logprob
            event.logprobs.top_token_ids.extend(token_id for token_id, _ in logprobs.top)
            event.logprobs.top_logprobs.extend(value for _, value in logprobs.top)
        return event

    def _end(self, request_id: str, origin: int, finished: bool = False) -> None:
        """The request ends here and its ``end`` goes on around the ring; one that ``finished``
        (EOS or max tokens) keeps its caches in the prompt cache first."""
        if finished:
            self._keep(request_id)
        self._forget(request_id)
        next_index = (self.stage_index + 1) % self.stage_count
        if next_index != origin:
            end = worker_pb2.EndRequest(origin=origin, finished=finished)
            try:
                self._forward(worker_pb2.StageMessage(request_id=request_id, end=end))
            except LinkBroken:
                pass  # the next stage is gone, and with it the request's caches there

    def _on_end(self, request_id: str, end: worker_pb2.EndRequest) -> None:
        self._end(request_id, end.origin, end.finished)

    def _on_cancel(self, request_id: str, cancel: worker_pb2.CancelRequest) -> None:
        state = self.requests.get(request_id)
        if state is not None:
            state.cancelled = True
