"""The ``mlx-ring`` transport: stage-to-stage messages on an ``mx.distributed`` ring (MLX's ring
backend, TCP between neighbouring stages) instead of gRPC's ``Forward`` stream.

The stages, in order, are the ring's ranks, so every stage-to-stage message (stage i to i+1, the
last stage's tokens back to stage 0) goes to a direct neighbour, the only kind of send the ring
backend has. Expert dispatch and the control plane stay on gRPC.

What MLX's ring backend asks of its user, and how this module answers:
- A group forms once per process, from a hostfile and a rank, and every rank must join within
  seconds of the others: ``join`` forms it at the start of the first load (the coordinator loads
  every node at once) and refuses a later load with another layout, naming what to do. MLX waits
  for the previous rank in ``accept`` for ever, holding the GIL: a helper process connects to the
  rank's own port at the deadline, so that a neighbour that never comes fails the load.
- ``recv`` needs the shape in advance: messages travel in fixed frames of ``FRAME_BYTES`` (length
  in the first bytes, the serialized ``StageMessage`` after), plus one more ``recv`` for
  the rest of a message that does not fit.
- A pending ``recv`` polls its non-blocking socket on a CPU core until bytes come (measured: a
  core per waiting receiver, which on this 2-core machine slowed decode 2.5x). The receiver
  therefore waits in ``select`` on the ring's socket (found by its local port) and posts the
  ``recv`` only once bytes are there; its own reads stay MLX's.
- MLX streams belong to the thread that made them: the sender and the receiver each make their
  own, and hand messages to the engine as protobuf, never as MLX arrays of their thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import psutil

from pomona.errors import PomonaError
from pomona.proto import worker_pb2

from .link import Link, LinkBroken

log = logging.getLogger(__name__)

FRAME_BYTES = 4096  # one send per message up to FRAME_BYTES - HEADER_BYTES (a decode step's)
HEADER_BYTES = 16  # uint64 length, padding
RING_FORM_TIMEOUT_S = 60.0
RESTART = "restart the cluster (pomona down, then pomona up), or use `transport: grpc`"


@dataclass
class Ring:
    """This process's place on its ring (formed once, kept for the process's lifetime)."""

    hosts: tuple[str, ...]
    rank: int
    group: object  # mx.distributed.Group
    receiver: RingReceiver

    @property
    def size(self) -> int:
        return len(self.hosts)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size} ({', '.join(self.hosts)})"


_lock = threading.Lock()
_ring: Ring | None = None
_forming_stuck = ""  # an attempt that never returned: MLX may still be waiting in it


def join(hosts: list[str], rank: int, deliver: Callable[[object], None]) -> Ring:
    """This process's ring: formed now (blocking until every neighbour has joined, at most
    ``RING_FORM_TIMEOUT_S``), or the one it joined before if ``hosts`` and ``rank`` are the same.
    Messages received from the previous rank go to ``deliver`` (a ``StageMessage``)."""
    global _ring, _forming_stuck
    with _lock:
        if _ring is not None:
            if (_ring.hosts, _ring.rank) == (tuple(hosts), rank):
                return _ring
            raise PomonaError(
                f"this worker is {_ring.describe()} of an mx.distributed ring since its first load, "
                f"and this load asks for rank {rank} of ({', '.join(hosts)}); MLX keeps a process's "
                f"ring for its lifetime, so a new layout needs new workers: {RESTART}"
            )
        if _forming_stuck:
            raise PomonaError(_forming_stuck)
        group = _form(hosts, rank)
        receiver = RingReceiver(group, (rank - 1) % len(hosts), _port(hosts[rank]), deliver)
        _ring = Ring(tuple(hosts), rank, group, receiver)
        log.info("joined the mx.distributed ring as %s", _ring.describe())
        return _ring


def current() -> Ring | None:
    return _ring


def _form(hosts: list[str], rank: int):
    global _forming_stuck
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pomona-ring-", delete=False) as file:
        json.dump([[host] for host in hosts], file)
    os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = file.name, str(rank)
    neighbours = f"{hosts[(rank - 1) % len(hosts)]} and {hosts[(rank + 1) % len(hosts)]}"
    deadline = time.monotonic() + RING_FORM_TIMEOUT_S
    try:
        while True:  # MLX connects to the next rank a few times, ~15 s: retry until the deadline
            unblocker = _unblocker(hosts[rank], max(deadline - time.monotonic(), 0.1))
            group, error = None, ""
            try:
                group = mx.distributed.init(strict=True, backend="ring")  # holds the GIL throughout
            except (RuntimeError, ValueError) as failure:
                error = str(failure)
            finally:
                unblocker.kill()
                fired = unblocker.wait() == UNBLOCKED
            if fired:  # nobody but the unblocker came: the group (if any) has no real neighbour
                _forming_stuck = (
                    f"the mx.distributed ring did not form within {RING_FORM_TIMEOUT_S:.0f} s: rank "
                    f"{rank} at {hosts[rank]} waited for its neighbours {neighbours}; check that every "
                    f"stage's worker is up and that these ports are reachable between the nodes, then "
                    f"{RESTART}"
                )
                raise PomonaError(_forming_stuck)
            if group is not None:
                return group
            if time.monotonic() >= deadline:
                raise PomonaError(
                    f"the mx.distributed ring did not form: rank {rank} at {hosts[rank]} could not "
                    f"reach its neighbours {neighbours} ({error}); check that these ports are "
                    f"reachable between the nodes, then {RESTART}"
                )
            log.info("ring not formed yet (%s); trying again", error)
            time.sleep(0.5)
    finally:
        os.unlink(file.name)


UNBLOCKED = 7  # the unblocker's exit status when it connected
_UNBLOCKER = """
import socket, sys, time
host, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
try:
    socket.create_connection((host, port), timeout=5).close()
except OSError:
    sys.exit(0)
sys.exit(7)
"""


def _unblocker(host: str, delay_s: float) -> subprocess.Popen:
    """MLX's ring init waits in ``accept`` for the previous rank for ever, holding the GIL (the
    whole worker stops, gRPC included): a process that connects to this rank's own ring port at
    the deadline ends that wait, so a neighbour that never comes costs an error, not a worker."""
    ip, port = host.rsplit(":", 1)
    return subprocess.Popen(
        [sys.executable, "-c", _UNBLOCKER, ip, port, f"{delay_s:.3f}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _port(host: str) -> int:
    return int(host.rsplit(":", 1)[1])


def _inbound_socket(local_port: int) -> int | None:
    """The file descriptor of the ring connection this process accepted on ``local_port`` (from
    the previous rank: the only established connection on the ring port, since MLX closes the
    listening socket once its neighbour is in); None where the platform does not say."""
    try:
        connections = psutil.Process().net_connections(kind="tcp")
    except psutil.Error:  # e.g. access denied: the receiver then polls (see RingReceiver)
        return None
    for connection in connections:
        if connection.laddr and connection.laddr.port == local_port and connection.raddr:
            if connection.status == psutil.CONN_ESTABLISHED and connection.fd >= 0:
                return connection.fd
    return None


def _frame(payload: bytes) -> tuple[np.ndarray, bytes]:
    """The fixed frame (header and the payload's head) and what of the payload does not fit."""
    frame = np.zeros(FRAME_BYTES, dtype=np.uint8)
    head = payload[: FRAME_BYTES - HEADER_BYTES]
    frame[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), dtype=np.uint8)
    frame[HEADER_BYTES : HEADER_BYTES + len(head)] = np.frombuffer(head, dtype=np.uint8)
    return frame, payload[len(head) :]


class RingReceiver:
    """Receives the previous rank's messages on its own thread."""

    def __init__(self, group, source: int, local_port: int, deliver: Callable[[object], None]):
        self._group, self._source, self._deliver = group, source, deliver
        self._fd = _inbound_socket(local_port)
        if self._fd is None:
            log.warning("the ring's inbound socket on port %d was not found: the receiver polls "
                        "its socket on a CPU core while it waits", local_port)
        threading.Thread(target=self._run, name="ring-receive", daemon=True).start()

    def _recv(self, size: int, stream) -> bytes:
        array = mx.distributed.recv((size,), mx.uint8, self._source, group=self._group, stream=stream)
        mx.eval(array)
        return memoryview(np.asarray(array)).tobytes()

    def _run(self) -> None:
        stream = mx.new_stream(mx.cpu)
        try:
            while True:
                if self._fd is not None:  # until bytes come: a pending recv would poll a core
                    select.select([self._fd], [], [])
                frame = self._recv(FRAME_BYTES, stream)
                length = int.from_bytes(frame[:8], "little")
                payload = frame[HEADER_BYTES : HEADER_BYTES + length]
                if length > len(payload):
                    payload += self._recv(length - len(payload), stream)
                try:
                    message = worker_pb2.StageMessage.FromString(payload)
                except Exception as error:  # noqa: BLE001 - a protobuf DecodeError: drop, go on
                    log.warning("dropped an undecodable ring message (%d bytes): %s", length, error)
                    continue
                self._deliver(message)
        except (RuntimeError, OSError, ValueError) as error:  # the previous rank is gone
            log.warning("the ring receiver stopped: %s", error)


class RingLink(Link):
    """Stage-to-stage messages to the next rank on the ring, sent in order from one thread."""

    def __init__(
        self,
        node: str,
        address: str,
        ring: Ring,
        on_broken: Callable[[str, str], None] | None = None,
    ):
        self.node, self.address = node, address
        self._ring = ring
        self._peer = (ring.rank + 1) % ring.size
        self._on_broken = on_broken or (lambda node, reason: None)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._failed = ""
        self._closed = False
        threading.Thread(target=self._run, name=f"ring-send-{node}", daemon=True).start()

    @property
    def broken(self) -> str:
        return "link closed" if self._closed else self._failed

    def send(self, message) -> None:
        if self._closed:
            raise LinkBroken(f"the link to node {self.node!r} is closed")
        if self._failed:
            raise LinkBroken(self._failed)
        self._outbox.put(message)

    def close(self) -> None:
        self._closed = True
        self._outbox.put(None)

    def _run(self) -> None:
        stream = mx.new_stream(mx.cpu)
        group = self._ring.group
        try:
            while (message := self._outbox.get()) is not None:
                frame, rest = _frame(message.SerializeToString())
                # One eval per send: two independent sends in one graph may run in either order.
                mx.eval(mx.distributed.send(mx.array(frame), self._peer, group=group, stream=stream))
                if rest:
                    tail = mx.array(np.frombuffer(rest, dtype=np.uint8))
                    mx.eval(mx.distributed.send(tail, self._peer, group=group, stream=stream))
        except RuntimeError as error:  # MLX: "[ring] connection to a peer was lost"
            if self._closed:
                return
            where = f"node {self.node!r} at {self.address}"
            self._failed = f"{where} is unreachable on the ring ({error}); {RESTART}"
            log.warning("ring link: %s", self._failed)
            self._on_broken(self.node, self._failed)
