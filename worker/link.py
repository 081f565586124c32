"""The data plane's outbound links, behind one interface: a ``Link`` carries messages in order to
one peer node (the next stage, or a node holding experts), hands whatever comes back to a callback,
and reports once, naming the peer, when it breaks.

gRPC is the transport here (the control plane is gRPC too): one persistent stream per link, which
is ``Forward`` (one-way) to the next stage and ``Experts`` (requests and replies) to an expert
node. Another transport (e.g. ``mx.distributed``) implements the same interface; the engine and
``DistributedSwitchGLU`` see only ``Link``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import grpc

from pomona import auth
from pomona.errors import PomonaError
from pomona.grpc_options import DATA_CHANNEL_OPTIONS
from pomona.proto import worker_pb2_grpc

log = logging.getLogger(__name__)

# After a break, a send reopens the stream at most this often, so that a peer that comes back is
# used again while one that is still down costs one fast failure per interval, not one per message.
RECONNECT_INTERVAL_S = 1.0


class LinkBroken(PomonaError):
    """A message cannot reach its peer node: the link is down."""


class Link(ABC):
    """An ordered, one-directional message path to ``node`` at ``address`` (replies, if the kind
    has any, go to the ``on_reply`` callback given at construction)."""

    node: str
    address: str

    @abstractmethod
    def send(self, message) -> None:
        """Queue ``message`` (never blocks on the network); raises ``LinkBroken`` when down."""

    @property
    @abstractmethod
    def broken(self) -> str:
        """Why the link is down, naming the peer; empty while it works."""

    @abstractmethod
    def close(self) -> None:
        """Stop the link; later sends raise."""


class GrpcLink(Link):
    """One persistent gRPC stream: ``kind`` "stage" (``Forward``) or "experts" (``Experts``)."""

    def __init__(
        self,
        node: str,
        address: str,
        kind: str,
        on_reply: Callable[[str, object], None] | None = None,
        on_broken: Callable[[str, str], None] | None = None,
    ):
        if kind not in ("stage", "experts"):
            raise ValueError(f"unknown link kind {kind!r}")
        self.node, self.address, self.kind = node, address, kind
        self._on_reply = on_reply or (lambda node, reply: None)
        self._on_broken = on_broken or (lambda node, reason: None)
        self._lock = threading.RLock()  # a failing reopen may report from within send()
        self._broken = ""
        self._broken_at = 0.0
        self._closed = False
        self._channel = auth.channel(address, DATA_CHANNEL_OPTIONS)  # the node's own secrets
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        # wait_for_ready on the first stream only: the peer may still be starting while this node
        # loads. A reopened stream must fail fast if the peer is still gone.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._open(wait_for_ready=True)

    def _open(self, wait_for_ready: bool) -> None:
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = outbox  # before the call starts: its failure may be reported at once
        messages = iter(outbox.get, None)
        if self.kind == "stage":
            call = self._stub.Forward.future(messages, wait_for_ready=wait_for_ready)
            call.add_done_callback(lambda done: self._stage_done(done, outbox))
        else:
            replies = self._stub.Experts(messages, wait_for_ready=wait_for_ready)
            threading.Thread(
                target=self._read, args=(replies, outbox), name=f"link-{self.node}", daemon=True
            ).start()

    def _stage_done(self, call, outbox) -> None:
        if call.cancelled():
            self._break(outbox, "the stream was cancelled")
            return
        error = call.exception()
        self._break(outbox, error.details() if error is not None else "the peer ended the stream")

    def _read(self, replies, outbox) -> None:
        try:
            for reply in replies:
                self._on_reply(self.node, reply)
            reason = "the peer ended the stream"
        except grpc.RpcError as error:
            reason = error.details() or str(error.code())
        self._break(outbox, reason)

    def _break(self, outbox, reason: str) -> None:
        with self._lock:
            if self._closed or outbox is not self._outbox or self._broken:
                return  # closing, an older stream, or already reported
            self._broken = f"node {self.node!r} at {self.address} is unreachable ({reason})"
            self._broken_at = time.monotonic()
            outbox.put(None)
        log.warning("link %s: %s", self.kind, self._broken)
        self._on_broken(self.node, self._broken)

    @property
    def broken(self) -> str:
        return "link closed" if self._closed else self._broken

    def send(self, message) -> None:
        with self._lock:
            if self._closed:
                raise LinkBroken(f"the link to node {self.node!r} is closed")
            if self._broken:
                if time.monotonic() - self._broken_at < RECONNECT_INTERVAL_S:
                    raise LinkBroken(self._broken)
                self._broken = ""
                self._open(wait_for_ready=False)
            self._outbox.put(message)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._outbox.put(None)
        self._channel.close()
