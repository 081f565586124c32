"""Expert traffic on a node's engine thread: the dispatches this node's MoE layers send to expert
nodes, and the expert requests other nodes send to this one, on one inbox.

Every dispatch gets an id, unique on this node; the reply carries it back and is matched by it. A
reply whose dispatch is no longer awaited (it timed out, or the request failed) is dropped and
counted, never handed to a later dispatch. While a dispatch waits, the engine keeps serving incoming
expert requests, so two stage nodes that hold each other's experts cannot deadlock.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from pomona.proto import worker_pb2

from .experts import ExpertHost, ExpertStats
from .link import GrpcLink, Link, LinkBroken

log = logging.getLogger(__name__)

# A dispatch without an answer for this long fails its request. Generous, since a big prefill chunk
# on a slow expert node takes a while; a dead node is noticed in ~2 s by its link instead.
DISPATCH_TIMEOUT_S = 60.0


class Dispatcher:
    def __init__(self, stats: ExpertStats) -> None:
        self.stats = stats
        self.host: ExpertHost | None = None
        self.links: dict[str, Link] = {}
        # ("request", ExpertRequest, respond) from gRPC handlers, ("reply", node, ExpertReply)
        # and ("broken", node, reason) from links.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._next_id = 1
        self._awaited: dict[int, str] = {}  # dispatch id -> node, sent and not yet answered
        self._arrived: dict[int, worker_pb2.ExpertReply] = {}
        self.dropped_replies = 0

    # -- links ----------------------------------------------------------------------------------

    def connect(self, addresses: dict[str, str]) -> None:
        """Open a link to every expert node (name -> host:port)."""
        self.close()
        self.links = {
            node: GrpcLink(node, address, "experts", self._on_reply, self._on_broken)
            for node, address in addresses.items()
        }

    def _on_reply(self, node: str, reply: worker_pb2.ExpertReply) -> None:
        self._inbox.put(("reply", node, reply))

    def _on_broken(self, node: str, reason: str) -> None:
        self._inbox.put(("broken", node, reason))

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links = {}
        self._awaited.clear()
        self._arrived.clear()

    # -- serving other nodes' requests ------------------------------------------------------------

    def submit_request(self, request: worker_pb2.ExpertRequest, respond: Callable) -> None:
        """From a gRPC handler thread: queue a request; ``respond(reply)`` runs on the engine."""
        self._inbox.put(("request", request, respond))

    def compute(self, request: worker_pb2.ExpertRequest) -> worker_pb2.ExpertReply:
        """Run a request on the experts held here; failures become the reply's error."""
        try:
            if self.host is None:
                raise ValueError("this node holds no experts")
            reply = self.host.compute(request)
        except Exception as error:
            reply = worker_pb2.ExpertReply(error=f"{type(error).__name__}: {error}")
        reply.dispatch_id = request.dispatch_id
        return reply

    def serve_pending(self) -> int:
        """Handle whatever the inbox holds, without waiting (engine thread); returns how many."""
        handled = 0
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return handled
            self._handle(item)
            handled += 1

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "request":
            _, request, respond = item
            respond(self.compute(request))
        elif kind == "reply":
            _, node, reply = item
            if self._awaited.get(reply.dispatch_id) == node:
                self._arrived[reply.dispatch_id] = reply
            else:  # late (its dispatch timed out or failed) or unknown: never another's
                self.dropped_replies += 1
                log.warning("dropped a stale reply from %s (dispatch %d)", node, reply.dispatch_id)
        # "broken" items only wake a waiting dispatch: the link itself knows it is down.

    # -- this node's dispatches (engine thread) ---------------------------------------------------

    def send(self, node: str, request: worker_pb2.ExpertRequest) -> int:
        """Send a request to ``node``; returns its dispatch id. Raises ``LinkBroken``."""
        dispatch_id = self._next_id
        self._next_id += 1
        request.dispatch_id = dispatch_id
        self.links[node].send(request)
        self._awaited[dispatch_id] = node
        return dispatch_id

    def receive(
        self, node: str, dispatch_id: int, timeout_s: float = DISPATCH_TIMEOUT_S
    ) -> worker_pb2.ExpertReply:
        """The reply to dispatch ``dispatch_id``, serving incoming requests while waiting."""
        deadline = time.monotonic() + timeout_s
        link = self.links[node]
        try:
            while dispatch_id not in self._arrived:
                if link.broken:
                    self.serve_pending()  # the reply may have come in before the break
                    if dispatch_id not in self._arrived:
                        raise LinkBroken(f"expert {link.broken}")
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expert node {node!r} did not answer within {timeout_s:.0f} s")
                try:
                    self._handle(self._inbox.get(timeout=remaining))
                except queue.Empty:
                    pass
            reply = self._arrived.pop(dispatch_id)
        finally:
            self._awaited.pop(dispatch_id, None)
        if reply.error:
            raise RuntimeError(f"expert node {node!r}: {reply.error}")
        return reply

    def abandon(self, dispatch_ids) -> None:
        """Forget dispatches whose replies nobody will read (their layer failed)."""
        for dispatch_id in dispatch_ids:
            self._awaited.pop(dispatch_id, None)
            self._arrived.pop(dispatch_id, None)
