"""The mlx-ring transport's raw round trip on loopback: two processes on an mx.distributed ring
(MLX's ring backend) ping-pong one frame (``worker.ring.FRAME_BYTES``, what a decode step's
message takes) with the data plane's own threads: each side sends from a sender thread fed by a
queue and receives on a receiver thread that waits in ``select`` on the ring's socket, as the
worker's receiver does, and hands the frame back through a queue.

    .venv/bin/python bench/ring_rtt.py            # prints the median round trip
"""

from __future__ import annotations

import json
import os
import queue
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster_helpers import free_ports  # noqa: E402

ROUNDS = 300


def _side(rank: int, hostfile: str) -> None:
    os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = hostfile, str(rank)
    import mlx.core as mx
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from worker.ring import FRAME_BYTES, _frame, _inbound_socket, _port

    group = mx.distributed.init(strict=True, backend="ring")
    peer = 1 - rank
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def send() -> None:
        stream = mx.new_stream(mx.cpu)
        while (payload := outbox.get()) is not None:
            frame, _ = _frame(payload)
            mx.eval(mx.distributed.send(mx.array(frame), peer, group=group, stream=stream))

    def receive() -> None:
        stream = mx.new_stream(mx.cpu)
        fd = _inbound_socket(_port(json.loads(Path(hostfile).read_text())[rank][0]))
        for _ in range(ROUNDS):
            if fd is not None:  # as the worker's receiver: wait in select, then recv
                select.select([fd], [], [])
            array = mx.distributed.recv((FRAME_BYTES,), mx.uint8, peer, group=group, stream=stream)
            mx.eval(array)
            inbox.put(memoryview(np.asarray(array)).tobytes())

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    threading.Thread(target=receive, daemon=True).start()
    payload = b"x" * 300
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        if rank == 0:
            outbox.put(payload)
            inbox.get(timeout=30)
        else:
            inbox.get(timeout=30)
            outbox.put(payload)
        times.append(time.perf_counter() - started)
    outbox.put(None)
    sender.join(timeout=30)  # the last reply is out before this side exits
    if rank == 0:
        print(json.dumps({"rtt_s": statistics.median(times[20:])}), flush=True)


def ring_round_trip_s(timeout_s: float = 120) -> float:
    """The median round trip of one ring frame between two fresh processes on loopback."""
    ports = free_ports(2)  # held at once while chosen: two different ports
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump([[f"127.0.0.1:{port}"] for port in ports], file)
    try:
        sides = [
            subprocess.Popen(
                [sys.executable, __file__, "--side", str(rank), file.name],
                stdout=subprocess.PIPE, text=True,
            )
            for rank in (0, 1)
        ]
        try:
            outputs = [side.communicate(timeout=timeout_s)[0] for side in sides]
        finally:
            for side in sides:
                side.kill()
        if any(side.returncode for side in sides):
            raise RuntimeError(f"the ring round-trip probe failed: {[s.returncode for s in sides]}")
        return json.loads(outputs[0].strip().splitlines()[-1])["rtt_s"]
    finally:
        os.unlink(file.name)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--side":
        _side(int(sys.argv[2]), sys.argv[3])
    else:
        print(f"ring round trip ({ROUNDS} rounds, loopback): {ring_round_trip_s() * 1e6:.0f} us")
