"""Heartbeats: the coordinator asks every serving node for its counters several times a second and
declares a node lost when none of its answers came back for ``SILENCE_S``.

A node that dies closes its sockets and is noticed by its broken streams; one that hangs
(SIGSTOPped, swapping to death, cut off without a FIN) keeps its TCP connections open, and gRPC's
keepalive did not close them here in under a minute (README, "What remains"). The heartbeat does
not depend on the transport noticing: it is an application-level answer. ``Status`` with
``counters_only`` is answered on a gRPC thread without waiting for the engine, so a node busy with
a long prefill still answers; pings overlap (one every ``INTERVAL_S``, each allowed up to
``SILENCE_S``), so one slow answer is no alarm, and a hung node is declared lost within
``SILENCE_S`` + ``INTERVAL_S`` + ``CHECK_S`` (under 3 s).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from pomona.proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

INTERVAL_S = 0.4  # a ping this often
SILENCE_S = 2.0  # no answer for this long: the node is lost
CHECK_S = 0.1
# If this loop itself did not run for this long (the coordinator's event loop was busy, e.g.
# tokenizing a huge prompt), answers may be waiting unread: the silence is ours, not the node's.
STALL_S = 0.5
MAX_OUTSTANDING = 8  # pings in flight at once (a hung node never answers them)


async def watch(
    name: str, stub: worker_pb2_grpc.WorkerStub, on_lost: Callable[[str, str], None]
) -> None:
    """Ping ``name`` until it has been silent for ``SILENCE_S``; then call ``on_lost(name, why)``
    once and return. Cancel the task to stop watching."""
    loop = asyncio.get_running_loop()
    last_answer = loop.time()
    pending: set[asyncio.Task] = set()

    async def ping() -> None:
        nonlocal last_answer
        try:
            await stub.Status(worker_pb2.StatusRequest(counters_only=True), timeout=SILENCE_S)
            last_answer = max(last_answer, loop.time())
        except grpc.aio.AioRpcError:
            pass  # silence: counted by the watcher below

    next_ping = last_check = loop.time()
    try:
        while True:
            now = loop.time()
            if now - last_check > STALL_S:
                last_answer = max(last_answer, now)  # start counting again
            last_check = now
            if now - last_answer > SILENCE_S:
                why = f"no heartbeat answer for {now - last_answer:.1f} s: it hangs, is stopped or is cut off"
                log.error("node %r: %s", name, why)
                on_lost(name, why)
                return
            if now >= next_ping and len(pending) < MAX_OUTSTANDING:
                task = asyncio.create_task(ping())
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_ping = now + INTERVAL_S
            await asyncio.sleep(CHECK_S)
    finally:
        for task in pending:
            task.cancel()
