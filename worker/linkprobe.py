"""Measuring a link from this node to another worker, with the data plane's own client stack.

A stage sends hidden states over a persistent gRPC stream from a queue drained on gRPC's thread;
the probe does the same over the `Ping` echo stream, so what it measures is what a hop costs:
round trips of decode-sized messages (latency: one-way = RTT / 2) and of prefill-sized ones
(bandwidth, from their extra time over the small ones). Every wait is bounded by the deadline.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time

import grpc

from pomona import auth
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.proto import worker_pb2, worker_pb2_grpc

WARMUP_ROUNDS = 3


class _EchoStream:
    """One Ping stream; `round_trip(payload)` sends it and waits for its echo."""

    def __init__(self, address: str, deadline: float):
        self._channel = auth.channel(address, CHANNEL_OPTIONS)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._deadline = deadline
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._replies = stub.Ping(self._messages(), timeout=max(deadline - time.monotonic(), 0.1))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _messages(self):
        while (message := self._outbox.get()) is not None:
            yield message

    def _read(self) -> None:
        try:
            for reply in self._replies:
                self._inbox.put(reply)
        except grpc.RpcError as error:
            self._inbox.put(error)

    def round_trip(self, payload: bytes) -> float:
        start = time.perf_counter()
        self._outbox.put(worker_pb2.PingMessage(payload=payload))
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the measurement ran out of time")
        try:
            reply = self._inbox.get(timeout=remaining)
        except queue.Empty:
            raise TimeoutError("no echo before the deadline") from None
        if isinstance(reply, grpc.RpcError):
            raise ConnectionError(reply.details() or str(reply.code()))
        if len(reply.payload) != len(payload):
            raise ConnectionError("the echo came back with a different size")
        return time.perf_counter() - start

    def close(self) -> None:
        self._outbox.put(None)
        self._replies.cancel()
        self._channel.close()
        self._reader.join(timeout=2)


def measure_link(
    name: str,
    address: str,
    small_bytes: int,
    large_bytes: int,
    small_rounds: int,
    large_rounds: int,
    timeout_s: float,
) -> worker_pb2.LinkMeasurement:
    """RTT median / p90 of `small_bytes` messages and bandwidth from `large_bytes` ones."""
    deadline = time.monotonic() + timeout_s
    stream = None
    try:
        stream = _EchoStream(address, deadline)
        small, large = bytes(max(small_bytes, 1)), bytes(max(large_bytes, small_bytes + 1))
        for _ in range(WARMUP_ROUNDS):
            stream.round_trip(small)
        small_rtts = sorted(stream.round_trip(small) for _ in range(max(small_rounds, 1)))
        stream.round_trip(large)  # warm up the flow-control windows
        large_rtts = sorted(stream.round_trip(large) for _ in range(max(large_rounds, 1)))
    except (TimeoutError, ConnectionError, grpc.RpcError) as error:
        detail = error.details() if isinstance(error, grpc.RpcError) else str(error)
        return worker_pb2.LinkMeasurement(target=name, error=f"{address}: {detail}")
    finally:
        if stream is not None:
            stream.close()
    median = statistics.median(small_rtts)
    p90 = small_rtts[min(len(small_rtts) - 1, int(0.9 * len(small_rtts)))]
    extra_s = statistics.median(large_rtts) - median
    # The payload crosses the link twice per round trip (there and echoed back).
    moved = 2 * (len(large) - len(small))
    bandwidth = moved / extra_s if extra_s > 0 else 2 * len(large) / statistics.median(large_rtts)
    return worker_pb2.LinkMeasurement(
        target=name, rtt_median_s=median, rtt_p90_s=p90, bandwidth_bytes_per_s=bandwidth
    )
