"""The emulation helpers: DelayProxy adds latency without limiting throughput and carries gRPC;
cgroup CPU throttling limits a process and cleans up after itself."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import psutil
import pytest

from tests.emulation import (
    DelayProxy,
    cpu_group,
    cpu_throttle,
    current_cgroup,
    throttle_available,
    throttled_python,
)

DELAY_S = 0.05
MARGIN_S = 0.2  # generous: the upper bounds only catch a proxy that serialises or stalls
WAIT_S = 10.0
ECHO_THREAD = "echo-server-connection"  # the echo server's own (not the proxy's) per-connection threads


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A raw TCP echo server on a thread; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stopping = threading.Event()
    threads: list[threading.Thread] = []

    def echo(connection: socket.socket) -> None:
        connection.settimeout(WAIT_S)
        with connection, contextlib.suppress(OSError):
            while data := connection.recv(65536):
                connection.sendall(data)

    def accept() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=echo, args=(connection,), name=ECHO_THREAD, daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        acceptor.join(WAIT_S)
        listener.close()
        for thread in threads:
            thread.join(WAIT_S)


def receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_proxy_adds_the_delay_both_ways(echo_server: int) -> None:
    with DelayProxy(0, "127.0.0.1", echo_server, DELAY_S) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S) as connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for size in (1, 1000, 300_000):
                payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                start = time.monotonic()
                connection.sendall(payload)
                assert receive_exactly(connection, size) == payload
                elapsed_s = time.monotonic() - start
                assert 2 * DELAY_S <= elapsed_s < 2 * DELAY_S + MARGIN_S, (size, elapsed_s)
        assert proxy.upstream.bytes_forwarded == proxy.downstream.bytes_forwarded == 301_001


def test_proxy_keeps_many_chunks_in_flight(echo_server: int) -> None:
    """Chunks sent 2 ms apart each arrive ~2 x delay later: the delay does not serialise them."""
    count, gap_s = 100, 0.002
    with DelayProxy(0, "127.0.0.1", echo_server, DELAY_S) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S) as connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            received = bytearray()
            reader = threading.Thread(
                target=lambda: received.extend(receive_exactly(connection, count)), daemon=True
            )
            start = time.monotonic()
            reader.start()
            for index in range(count):
                connection.sendall(bytes([index]))
                time.sleep(gap_s)
            reader.join(WAIT_S)
            elapsed_s = time.monotonic() - start
    assert bytes(received) == bytes(range(count))  # every byte, in order
    # Serialised on the delay this would take count x 2 x delay = 10 s.
    assert count * gap_s + 2 * DELAY_S <= elapsed_s < count * gap_s + 2 * DELAY_S + 1.0


def test_proxy_caps_bandwidth(echo_server: int) -> None:
    size, bytes_per_s = 200_000, 1_000_000  # 0.2 s on the wire each way, pipelined
    with DelayProxy(0, "127.0.0.1", echo_server, 0.0, bytes_per_s=bytes_per_s) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S) as connection:
            start = time.monotonic()
            connection.sendall(b"b" * size)
            receive_exactly(connection, size)
            elapsed_s = time.monotonic() - start
    assert size / bytes_per_s <= elapsed_s < 2 * size / bytes_per_s + MARGIN_S


def test_stop_leaves_no_thread_or_socket(echo_server: int) -> None:
    me = psutil.Process()
    threads_before, fds_before = set(threading.enumerate()), me.num_fds()
    proxy = DelayProxy(0, "127.0.0.1", echo_server, DELAY_S).start()
    # A connection still open at stop(): stop must close it, not wait for the client.
    connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S)
    connection.sendall(b"ping")
    assert receive_exactly(connection, 4) == b"ping"
    proxy.stop()
    assert connection.recv(1) == b""  # the proxy closed its side
    connection.close()
    proxy.stop()  # idempotent

    # The echo server's thread for the proxy's upstream connection is the fixture's, not the
    # proxy's; it ends when it sees that connection close, a moment after stop() returns.
    new_threads = set(threading.enumerate()) - threads_before
    assert not [thread for thread in new_threads if thread.name != ECHO_THREAD], new_threads
    ports = {proxy.port, echo_server}
    leftovers = [
        c for c in me.net_connections("tcp")
        if (c.laddr and c.laddr.port == proxy.port) or (c.raddr and c.raddr.port in ports)
    ]
    assert not leftovers
    assert me.num_fds() <= fds_before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


@pytest.fixture
def grpc_echo() -> Iterator[int]:
    """A gRPC server with raw-bytes unary and bidirectional-stream echo methods; yields its port."""
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda request, _: request),
            "Stream": grpc.stream_stream_rpc_method_handler(lambda requests, _: iter(requests)),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(WAIT_S)


def test_proxy_carries_grpc(grpc_echo: int) -> None:
    options = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 8 << 20)]
    with DelayProxy(0, "127.0.0.1", grpc_echo, DELAY_S) as proxy:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=options) as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            assert unary(b"warm up", timeout=WAIT_S) == b"warm up"  # connects: several round trips
            start = time.monotonic()
            assert unary(b"hello", timeout=WAIT_S) == b"hello"
            elapsed_s = time.monotonic() - start
            assert 2 * DELAY_S <= elapsed_s < 2 * DELAY_S + MARGIN_S
            big = bytes(range(256)) * 16384  # 4 MiB: HTTP/2 flow control across the delay
            assert unary(big, timeout=WAIT_S) == big

            stream = channel.stream_stream("/test.Echo/Stream")
            messages = [bytes([i]) * 100 for i in range(50)]
            assert list(stream(iter(messages), timeout=WAIT_S)) == messages
        assert proxy.connections_accepted == 1


def test_proxy_to_a_closed_port_closes_the_client() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    dead_port = listener.getsockname()[1]
    listener.close()
    with DelayProxy(0, "127.0.0.1", dead_port, DELAY_S) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S) as connection:
            assert connection.recv(1) == b""


# --- CPU throttling ---------------------------------------------------------------------------

available, why_not = throttle_available()
needs_cgroups = pytest.mark.skipif(not available, reason=why_not)
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


@pytest.fixture
def busy_child() -> Iterator[subprocess.Popen]:
    child = subprocess.Popen(BUSY_LOOP)
    try:
        yield child
    finally:
        child.kill()
        child.wait(WAIT_S)


def cpu_per_wall_second(pid: int, wall_s: float = 1.0) -> float:
    process = psutil.Process(pid)
    before, start = process.cpu_times(), time.monotonic()
    time.sleep(wall_s)
    after, elapsed_s = process.cpu_times(), time.monotonic() - start
    return (after.user + after.system - before.user - before.system) / elapsed_s


def cpu_cgroup_of(pid: int) -> str:
    return str(current_cgroup(pid))


@needs_cgroups
def test_throttle_limits_cpu_and_cleans_up(busy_child: subprocess.Popen) -> None:
    home = cpu_cgroup_of(busy_child.pid)
    unthrottled = cpu_per_wall_second(busy_child.pid)
    with cpu_throttle(busy_child.pid, 0.25) as group:
        assert cpu_cgroup_of(busy_child.pid).endswith(group.path.name)
        throttled = cpu_per_wall_second(busy_child.pid)
        assert group.throttled_count() > 0
    assert not group.path.exists()
    assert cpu_cgroup_of(busy_child.pid) == home  # moved back where it came from
    # The quota is a hard cap whatever else runs; the ratio needs the unthrottled run to get a CPU.
    assert throttled < 0.4, throttled
    if unthrottled > 0.6:
        assert throttled / unthrottled < 0.6, (throttled, unthrottled)


@needs_cgroups
def test_throttle_survives_the_process_dying(busy_child: subprocess.Popen) -> None:
    with cpu_throttle([busy_child.pid], 0.25) as group:
        busy_child.kill()
        busy_child.wait(WAIT_S)
    assert not group.path.exists()


@needs_cgroups
def test_throttled_python_joins_before_it_runs(tmp_path: Path) -> None:
    with cpu_group(0.25) as group:
        wrapper = throttled_python(group.path, tmp_path)
        result = subprocess.run(
            [str(wrapper), "-c", "print(open('/proc/self/cgroup').read())"],
            capture_output=True, text=True, timeout=WAIT_S,
        )
        assert result.returncode == 0, result.stderr
        assert group.path.name in result.stdout
        # Still running when the group goes: moved out (to the parent), and the group removed.
        child = subprocess.Popen([str(wrapper), "-c", "while True: pass"])
        try:
            deadline = time.monotonic() + WAIT_S
            while child.pid not in group.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert cpu_per_wall_second(child.pid) < 0.4
            group.remove()
            assert not group.path.exists()
            assert group.path.name not in cpu_cgroup_of(child.pid)
        finally:
            child.kill()
            child.wait(WAIT_S)
    # A wrapper whose group is gone refuses to start rather than run unthrottled.
    result = subprocess.run([str(wrapper), "-c", "pass"], capture_output=True, timeout=WAIT_S)
    assert result.returncode == 97
