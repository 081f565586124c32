"""Bad input on the raw ports of a real cluster: each gets a clear error, nothing crashes, and a
good request generating at the same time gets exactly the tokens of an undisturbed run.

The cluster: a tiny Mixtral, stage a = layers [0, 1), stage b = [1, 4), node c holds experts 4-7
of every layer. Every bad input is sent with the cluster's token (without it, it would only get
UNAUTHENTICATED: see test_auth.py), straight to a coordinator or worker port, while a good
request is mid-generation.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import yaml
from cluster_helpers import running_cluster
from layouts import PROMPT
from tiny_models import make_tiny_checkpoint, reference_generate

from pomona import auth
from pomona.grpc_options import CHANNEL_OPTIONS, MAX_STREAMS_PER_CONNECTION
from pomona.proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from pomona.tokenizer import load_tokenizer

NEW_TOKENS = 16
HIDDEN = 64  # the tiny checkpoints' hidden size
VOCAB = 300
EVENT_TIMEOUT_S = 60.0
OK = grpc.StatusCode.OK


@dataclass
class Ports:
    """Authenticated channels to every node of the running cluster, and their token events."""

    coordinator: grpc.Channel
    workers: dict[str, grpc.Channel]
    events: dict[str, queue.SimpleQueue]  # request id -> its token events, from every node

    def worker(self, name: str) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self.workers[name])

    def event_queue(self, request_id: str) -> queue.SimpleQueue:
        return self.events.setdefault(request_id, queue.SimpleQueue())

    def error_of(self, request_id: str) -> str:
        """The error a worker reported for ``request_id`` (waits for it, bounded)."""
        events = self.event_queue(request_id)
        while True:
            event = events.get(timeout=EVENT_TIMEOUT_S)
            if event.error:
                return event.error


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    path = make_tiny_checkpoint("mixtral", root / "mixtral")
    experts = [{"node": "c", "layers": [0, 4], "experts": [4, 8]}]
    with running_cluster(root / "c", path, 3, [(0, 1), (1, 4)], experts) as client:
        config = yaml.safe_load((root / "c" / "cluster.yaml").read_text())
        node_secrets = client.node_secrets()
        workers = {
            node["name"]: auth.channel(f"127.0.0.1:{node['port']}", CHANNEL_OPTIONS, node_secrets)
            for node in config["nodes"]
        }
        address = f"127.0.0.1:{config['coordinator']['port']}"
        ports = Ports(auth.channel(address, CHANNEL_OPTIONS, node_secrets), workers, {})
        subscriptions = [
            worker_pb2_grpc.WorkerStub(c).Results(worker_pb2.ResultsRequest()) for c in workers.values()
        ]

        def collect(stream) -> None:
            try:
                for message in stream:
                    for event in message.events:
                        ports.event_queue(event.request_id).put(event)
            except grpc.RpcError:
                pass  # cancelled at teardown

        readers = [threading.Thread(target=collect, args=(s,), daemon=True) for s in subscriptions]
        for reader in readers:
            reader.start()
        expected = reference_generate(path, load_tokenizer(path).encode(PROMPT), NEW_TOKENS)
        try:
            yield client, ports, expected
        finally:
            for stream in subscriptions:
                stream.cancel()
            for channel in [ports.coordinator, *workers.values()]:
                channel.close()


# -- the bad inputs --------------------------------------------------------------------------------


def _status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(result)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


def _raw(ports: Ports, node: str, kind: str, path: str, payload):
    """Raw bytes to ``node`` ("coordinator" or a worker), as any gRPC client could send them."""
    def call():
        channel = ports.coordinator if node == "coordinator" else ports.workers[node]
        return getattr(channel, kind)(path)(payload, timeout=30)
    return call


def _forward(ports: Ports, node: str, *messages: worker_pb2.StageMessage):
    return lambda: ports.worker(node).Forward(iter(messages), timeout=30)


def _start(request_id: str, prompt=(5, 6, 7), max_tokens: int = 4, **sampling) -> worker_pb2.StageMessage:
    start = worker_pb2.StartRequest(
        prompt_token_ids=list(prompt), max_tokens=max_tokens, prefill_chunk_tokens=256,
        sampling=worker_pb2.SamplingParams(**sampling),
    )
    return worker_pb2.StageMessage(request_id=request_id, start=start)


def _hidden(values: np.ndarray, dtype: str = "float32", shape=None) -> worker_pb2.Tensor:
    return worker_pb2.Tensor(data=values.tobytes(), dtype=dtype, shape=list(shape or values.shape))


def _activations(request_id: str, tensor: worker_pb2.Tensor) -> worker_pb2.StageMessage:
    return worker_pb2.StageMessage(
        request_id=request_id, activations=worker_pb2.Activations(hidden=tensor)
    )


def _decode_step(request_ids: list[str], tensor: worker_pb2.Tensor) -> worker_pb2.StageMessage:
    step = worker_pb2.DecodeStep(batch=0, step=1, request_ids=request_ids, hidden=tensor)
    return worker_pb2.StageMessage(request_id="batch-0", decode_step=step)


def _decode_tokens(request_id: str, token_id: int) -> worker_pb2.StageMessage:
    tokens = worker_pb2.DecodeTokens(batch=0, step=1, request_ids=[request_id], token_ids=[token_id])
    return worker_pb2.StageMessage(request_id="batch-0", decode_tokens=tokens)


def _experts(ports: Ports, **fields) -> Callable[[], str]:
    """Send one expert request to node c; its reply's error."""
    defaults = {"layer": 0, "hidden": _hidden(np.ones((1, HIDDEN), np.float32)), "pair_rows": [0],
                "pair_experts": [4], "dispatch_id": 7}
    request = worker_pb2.ExpertRequest(**{**defaults, **fields})
    replies = ports.worker("c").Experts(iter([request]), timeout=30)
    reply = next(iter(replies))
    assert reply.dispatch_id == 7
    return reply.error


def _generate(ports: Ports, **fields):
    request = coordinator_pb2.GenerateRequest(**{"prompt": "hi", "raw": True, "max_tokens": 2, **fields})
    return lambda: coordinator_pb2_grpc.CoordinatorStub(ports.coordinator).Generate(request, timeout=30)


def _request_error(ports: Ports, node: str, request_id: str, *messages) -> str:
    """Send ``messages`` on one Forward stream to ``node``; the error the request failed with."""
    code, details = _status_of(_forward(ports, node, *messages))
    assert code == OK, details
    return ports.error_of(request_id)


def _started_at_b(request_id: str) -> worker_pb2.StageMessage:
    return _start(request_id, prompt=())  # stage b (not first) takes a start without prompt


def _streams_on_one_connection(ports: Ports, count: int = 40) -> str:
    """Open ``count`` echo streams on one connection to node b; how many got a slot in time."""
    stub, release = ports.worker("b"), threading.Event()

    def held(first: worker_pb2.PingMessage):
        yield first
        release.wait(10)  # keep the stream open until every stream has tried

    streams = [stub.Ping(held(worker_pb2.PingMessage(payload=b"x")), timeout=5) for _ in range(count)]
    answered = [0]

    def first_echo(stream) -> None:
        try:
            next(stream)
            answered[0] += 1
        except grpc.RpcError:
            pass

    readers = [threading.Thread(target=first_echo, args=(s,)) for s in streams]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(2.0 if reader is readers[0] else 0.05)
    opened = answered[0]
    release.set()
    # 32 streams per connection (MAX_STREAMS_PER_CONNECTION); this channel's Results stream holds one.
    assert 16 <= opened <= MAX_STREAMS_PER_CONNECTION - 1, opened
    for stream in streams:
        stream.cancel()
    for reader in readers:
        reader.join(10)
    return f"{opened} of {count} streams answered while the rest waited for a slot"


# name -> (what to send, expected status code or None for a request error, words the error has)
def bad_inputs(ports: Ports) -> dict[str, tuple[Callable[[], object], object, str]]:
    big = b"x" * (40 * 2**20)
    nan = np.full((1, 1, HIDDEN), np.nan, np.float32)
    ones = np.ones((1, 1, HIDDEN), np.float32)
    ones_rows = np.ones((2, 1, HIDDEN), np.float32)
    return {
        "garbage bytes to Forward": (
            _raw(ports, "a", "stream_unary", "/pomona.v1.Worker/Forward", iter([b"\xff\xfe\x00garbage"])),
            grpc.StatusCode.INTERNAL, "deserializing"),
        "garbage bytes to LoadShard": (
            _raw(ports, "a", "unary_stream", "/pomona.v1.Worker/LoadShard", b"\x0a\xff\xff\xff"),
            grpc.StatusCode.INTERNAL, "deserializing"),
        "garbage bytes to Generate": (  # grpc.aio's own words for an unparsable request
            _raw(ports, "coordinator", "unary_stream", "/pomona.v1.Coordinator/Generate", b"\x12\x80"),
            grpc.StatusCode.UNKNOWN, "Error parsing message with type 'pomona.v1.GenerateRequest'"),
        "huge message to a worker": (
            _raw(ports, "b", "stream_stream", "/pomona.v1.Worker/Ping", iter([big])),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        "huge prompt to the coordinator": (
            _generate(ports, prompt="word " * (4 * 2**20)),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        "request id too long": (
            _forward(ports, "a", _start("r" * 300)), grpc.StatusCode.INVALID_ARGUMENT, "request id"),
        "request id with odd characters": (
            _forward(ports, "a", _start("../../etc/passwd")), grpc.StatusCode.INVALID_ARGUMENT, "request id"),
        "message without a body": (
            _forward(ports, "a", worker_pb2.StageMessage(request_id="empty-1")),
            grpc.StatusCode.INVALID_ARGUMENT, "no body"),
        "duplicate request id": (
            _forward(ports, "a", _start("dup-1", max_tokens=40), _start("dup-1", max_tokens=40)),
            grpc.StatusCode.INVALID_ARGUMENT, "already in use"),
        "prompt token id beyond the vocabulary": (
            lambda: _request_error(ports, "a", "vocab-1", _start("vocab-1", prompt=(5, 10**6))),
            None, "outside the vocabulary"),
        "negative prompt token id": (
            lambda: _request_error(ports, "a", "neg-1", _start("neg-1", prompt=(-3, 5))),
            None, "outside the vocabulary"),
        "empty prompt": (
            lambda: _request_error(ports, "a", "empty-prompt", _start("empty-prompt", prompt=())),
            None, "empty prompt"),
        "NaN temperature on the wire": (
            lambda: _request_error(ports, "a", "nan-t", _start("nan-t", temperature=math.nan)),
            None, "temperature must be a finite number"),
        "top_k beyond the vocabulary": (
            lambda: _request_error(ports, "a", "topk-1", _start("topk-1", temperature=1.0, top_k=10**6)),
            None, "top_k"),
        "hidden states of the wrong width": (
            lambda: _request_error(ports, "b", "width-1", _started_at_b("width-1"),
                                   _activations("width-1", _hidden(np.ones((1, 1, 7), np.float32)))),
            None, f"[1, tokens, {HIDDEN}]"),
        "hidden states with NaN": (
            lambda: _request_error(ports, "b", "nan-1", _started_at_b("nan-1"),
                                   _activations("nan-1", _hidden(nan))),
            None, "inf or NaN"),
        "hidden states of an integer dtype": (
            lambda: _request_error(ports, "b", "int-1", _started_at_b("int-1"),
                                   _activations("int-1", _hidden(ones.astype(np.int32), "int32"))),
            None, "dtype 'int32'"),
        "hidden states shorter than their shape": (
            lambda: _request_error(ports, "b", "short-1", _started_at_b("short-1"),
                                   _activations("short-1", _hidden(ones[:, :, :10], shape=[1, 1, HIDDEN]))),
            None, "bytes"),
        "more tokens than a chunk": (
            lambda: _request_error(ports, "b", "long-1", _started_at_b("long-1"),
                                   _activations("long-1", _hidden(np.ones((1, 300, HIDDEN), np.float32)))),
            None, "1 to 256 tokens"),
        "hidden states to the first stage": (
            lambda: _request_error(ports, "a", "first-1", _start("first-1", max_tokens=30),
                                   _activations("first-1", _hidden(ones))),
            None, "first stage takes token ids"),
        "next token beyond the vocabulary": (
            lambda: _request_error(ports, "a", "next-1", _start("next-1", max_tokens=30),
                                   _decode_tokens("next-1", 10**9)),
            None, "outside the vocabulary"),
        "decode step rows that do not match its hidden states": (
            lambda: _request_error(ports, "b", "rows-1", _started_at_b("rows-1"),
                                   _decode_step(["rows-1"], _hidden(ones_rows))),
            None, f"[1, 1, {HIDDEN}]"),
        "a decode step naming a request twice": (
            lambda: _request_error(ports, "b", "twice-1", _started_at_b("twice-1"),
                                   _decode_step(["twice-1"] * 2, _hidden(ones_rows))),
            None, "distinct requests"),
        "expert request for a layer not held": (lambda: _experts(ports, layer=99), None, "layer 99"),
        "negative expert id": (lambda: _experts(ports, pair_experts=[-1]), None, "expert ids must be"),
        "unknown expert id": (lambda: _experts(ports, pair_experts=[8]), None, "expert ids must be"),
        "expert pair row out of range": (lambda: _experts(ports, pair_rows=[5]), None, "pair_rows"),
        "expert hidden of the wrong width": (
            lambda: _experts(ports, hidden=_hidden(np.ones((1, 3), np.float32))), None, f"[rows, {HIDDEN}]"),
        "a second LoadShard mid-generation": (
            lambda: ports.worker("a").LoadShard(worker_pb2.LoadShardRequest(model_path="/tmp", layer_end=1)),
            grpc.StatusCode.FAILED_PRECONDITION, "already holds layers [0, 1)"),
        "link measurement of 1000 targets": (
            lambda: ports.worker("a").MeasureLinks(worker_pb2.MeasureLinksRequest(
                targets=[worker_pb2.LinkTarget(name="x", address="127.0.0.1:1")] * 1000, timeout_s=1)),
            grpc.StatusCode.INVALID_ARGUMENT, "at most 64 targets"),
        "profile of a billion-token context": (
            lambda: ports.worker("c").Profile(worker_pb2.ProfileRequest(long_context=10**9, time_budget_s=1)),
            grpc.StatusCode.INVALID_ARGUMENT, "contexts"),
        "NaN temperature to the coordinator": (
            _generate(ports, sampling=worker_pb2.SamplingParams(temperature=math.nan)),
            grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        "unknown chat role": (
            _generate(ports, raw=False, messages=[coordinator_pb2.ChatMessage(role="root", content="x")]),
            grpc.StatusCode.INVALID_ARGUMENT, "chat role"),
        "40 streams on one connection": (
            lambda: _streams_on_one_connection(ports), None, "of 40 streams answered while the rest waited"),
        "a thousand stop strings": (
            _generate(ports, stop=["x"] * 1000), grpc.StatusCode.INVALID_ARGUMENT, "stop strings"),
    }


NAMES = list(bad_inputs(Ports(None, {}, {})))  # the table's names; nothing is sent here


def test_at_least_twenty_bad_inputs():
    assert len(NAMES) >= 20


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_gets_a_clear_error_and_spares_a_concurrent_request(cluster, name):
    client, ports, expected = cluster
    send, code, words = bad_inputs(ports)[name]
    request = coordinator_pb2.GenerateRequest(
        prompt=PROMPT, raw=True, max_tokens=NEW_TOKENS, ignore_eos=True, sampling=worker_pb2.SamplingParams()
    )
    good = client.stub.Generate(request, timeout=300)
    tokens = list(next(good).token_ids)  # the good request is generating now
    if code is None:  # fails one request: the error it reported
        details = send()
    else:
        got, details = _status_of(send)
        assert got == code, (got, details)
    assert words in details, details
    assert "Traceback" not in details
    for chunk in good:
        tokens += chunk.token_ids
    assert tokens == expected
    assert client.status().state == "ready"


def test_after_every_bad_input_the_cluster_serves_and_holds_no_stray_caches(cluster):
    client, ports, expected = cluster
    assert list(client.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS).token_ids) == expected
    status = client.status()
    assert {s.node: s.state for s in status.stages} == {"a": "ready", "b": "ready", "c": "ready"}
    # Requests the bad inputs started ran out or failed, and freed their caches everywhere.
    deadline = 30
    for _ in range(deadline * 10):
        stages = client.status().stages
        if all(s.active_requests == 0 for s in stages):
            break
        threading.Event().wait(0.1)
    assert [s.active_requests for s in stages] == [0, 0, 0]
