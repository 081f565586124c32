"""Emulate a heterogeneous cluster on one Linux machine: slower nodes and slower links.

- CPU: a cgroup CPU quota (v1 `cpu.cfs_quota_us`, or v2 `cpu.max`) limits a process, all its threads
  and its later children to a fraction of one CPU. `cpu_throttle` moves running processes in;
  `throttled_python` writes an interpreter wrapper that joins the group before exec, so a worker that
  `pomona up` launches (node `python:` in cluster.yaml) is slow from its first instruction, profiling
  included.
- Links: `tc netem` is missing from this kernel, so `DelayProxy` adds one-way latency in user space:
  a TCP forwarder that delivers every chunk `one_way_delay_s` after it arrived, in order, with many
  chunks in flight (the delay is latency, not a throughput limit), plus an optional bandwidth cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000  # 10 ms (the default is 100 ms): short measurements see the cap, not bursts
MIN_QUOTA_US = 1_000  # the kernel rejects quotas below 1 ms
RMDIR_WAIT_S = 5.0  # an exiting task can keep a group busy for a moment
GROUP_PREFIX = "pomona-emulation-"


def _cgroup_root() -> tuple[str, Path] | None:
    """('v1', cpu hierarchy) or ('v2', unified root with the cpu controller), v1 first (hybrid hosts)."""
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        return "v1", CGROUP_V1_CPU
    controllers = CGROUP_V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return "v2", CGROUP_V2_ROOT
    return None


def _current_cgroup(pid: int, version: str, root: Path) -> Path:
    """The cpu cgroup directory `pid` is in now (the root if it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, relative = line.split(":", 2)
            if (version == "v2" and controllers == "") or (
                version == "v1" and "cpu" in controllers.split(",")
            ):
                return root / relative.lstrip("/")
    return root


def current_cgroup(pid: int) -> Path | None:
    """The cpu cgroup directory `pid` is in (None without a cgroup cpu controller)."""
    found = _cgroup_root()
    return None if found is None else _current_cgroup(pid, *found)


def _move(pid: int, cgroup_dir: Path) -> bool:
    """Move a process with all its threads; False if it no longer exists."""
    try:
        (cgroup_dir / "cgroup.procs").write_text(f"{pid}\n")
        return True
    except ProcessLookupError:
        return False
    except OSError as error:
        if error.errno == errno.ESRCH:
            return False
        raise


class CpuGroup:
    """A fresh cgroup whose members share `fraction` of one CPU (2.0: two CPUs' worth)."""

    def __init__(self, fraction: float, name: str | None = None) -> None:
        found = _cgroup_root()
        if found is None:
            raise RuntimeError("no cgroup cpu controller on this machine")
        self.version, self.root = found
        self.path = self.root / (name or f"{GROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._origins: dict[int, Path] = {}
        if self.version == "v2":
            # A v2 group only gets cpu.max when its parent delegates the controller.
            with contextlib.suppress(OSError):
                (self.root / "cgroup.subtree_control").write_text("+cpu\n")
        self.path.mkdir()
        try:
            self.set_fraction(fraction)
        except BaseException:
            self.path.rmdir()
            raise

    def set_fraction(self, fraction: float) -> None:
        if fraction <= 0:
            raise ValueError(f"fraction must be > 0, not {fraction}")
        quota_us = max(MIN_QUOTA_US, round(fraction * PERIOD_US))
        if self.version == "v1":
            # Period first: a quota must be valid against the period in force when it is written.
            (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
        else:
            (self.path / "cpu.max").write_text(f"{quota_us} {PERIOD_US}\n")

    def add(self, pid: int) -> None:
        """Move a running process (all its threads) in; it returns where it came from on `remove`."""
        origin = _current_cgroup(pid, self.version, self.root)
        if not _move(pid, self.path):
            raise ProcessLookupError(f"no process {pid} to throttle")
        self._origins.setdefault(pid, origin)

    def pids(self) -> list[int]:
        with contextlib.suppress(FileNotFoundError):
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        return []

    def throttled_count(self) -> int:
        """How many periods the quota stopped the group (proof that it bites)."""
        with contextlib.suppress(FileNotFoundError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, value = line.split()
                if key == "nr_throttled":
                    return int(value)
        return 0

    def remove(self) -> None:
        """Move every member back (added ones to where they came from, children to the parent) and
        delete the group. Safe to call twice, and when members have died."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + RMDIR_WAIT_S
        while True:
            for pid in self.pids():
                _move(pid, self._origins.get(pid, self.path.parent))
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:
                # EBUSY: a member forked or was still exiting while we moved the others; go again.
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


def throttle_available() -> tuple[bool, str]:
    """(True, '') where `cpu_throttle` can work, else (False, why) for `pytest.skip`."""
    if sys.platform != "linux":
        return False, f"cgroup CPU throttling needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return False, "cgroup CPU throttling needs root"
    if _cgroup_root() is None:
        return False, "no cgroup cpu controller mounted (v1 /sys/fs/cgroup/cpu or v2 with cpu)"
    try:
        CpuGroup(0.5).remove()  # the real test: a container may mount cgroups read-only
    except (OSError, RuntimeError) as error:
        return False, f"cannot create a cgroup with a CPU quota: {error}"
    return True, ""


@contextlib.contextmanager
def cpu_group(fraction: float, name: str | None = None) -> Iterator[CpuGroup]:
    """A CPU-limited group for the duration of the block, removed afterwards."""
    group = CpuGroup(fraction, name)
    try:
        yield group
    finally:
        group.remove()


@contextlib.contextmanager
def cpu_throttle(pids_or_pid: int | Iterable[int], fraction: float) -> Iterator[CpuGroup]:
    """Limit running processes to a shared `fraction` of one CPU until the block ends."""
    pids = [pids_or_pid] if isinstance(pids_or_pid, int) else list(pids_or_pid)
    with cpu_group(fraction) as group:
        for pid in pids:
            group.add(pid)
        yield group


def throttled_python(
    cgroup_dir: Path | str, directory: Path | str | None = None, python: str = sys.executable
) -> Path:
    """Write an executable that joins `cgroup_dir` and then execs `python` with its arguments.

    Use it as a node's `python:` in cluster.yaml: exec keeps the pid, so the worker pid that
    `pomona up` records is the throttled one, and the worker is slow from before its imports.
    It exits 97 without starting Python if it cannot join (the group is gone), so a test
    never silently measures an unthrottled worker.
    """
    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="pomona-"))
    procs = shlex.quote(str(Path(cgroup_dir) / "cgroup.procs"))
    script = directory / f"python-in-{Path(cgroup_dir).name}"
    script.write_text(
        "#!/bin/sh\n"
        f"echo $$ > {procs} || {{ echo 'cannot join cgroup {Path(cgroup_dir).name}' >&2; exit 97; }}\n"
        f'exec {shlex.quote(python)} "$@"\n'
    )
    script.chmod(0o755)
    return script


CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 1024  # up to 64 MiB in flight per direction: ample for any delay x bandwidth here
STOP_TIMEOUT_S = 5.0


class _Link:
    """One direction of the emulated link, shared by all connections (like a real wire)."""

    def __init__(self, one_way_delay_s: float, bytes_per_s: float | None) -> None:
        self.one_way_delay_s = one_way_delay_s
        self.bytes_per_s = bytes_per_s
        self.free_at = 0.0  # when the wire finishes sending what is already queued
        self.bytes_forwarded = 0

    def delivery_time(self, now: float, size: int) -> float:
        if self.bytes_per_s is None:
            return now + self.one_way_delay_s
        self.free_at = max(now, self.free_at) + size / self.bytes_per_s
        return self.free_at + self.one_way_delay_s


class DelayProxy:
    """A TCP forwarder on `listen_host:port` to `target_host:target_port` adding latency.

    Every chunk read from one side is written to the other at arrival + `one_way_delay_s`
    (plus its transmission time at `bytes_per_s`, if set); a reader never waits for the delay, so
    throughput is kept. Bytes and order are untouched, so HTTP/2 (gRPC) passes unchanged.
    """

    def __init__(
        self,
        listen_port: int,
        target_host: str,
        target_port: int,
        one_way_delay_s: float,
        *,
        bytes_per_s: float | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.listen_host, self.port = listen_host, listen_port
        self.target = (target_host, target_port)
        self.upstream = _Link(one_way_delay_s, bytes_per_s)  # client -> target
        self.downstream = _Link(one_way_delay_s, bytes_per_s)  # target -> client
        self.connections_accepted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> DelayProxy:
        # Bind here, not in the thread, so `.port` is known (and errors raised) when start returns.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.listen_host, self.port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, sock=listener)
            )
            started.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, name=f"DelayProxy:{self.port}", daemon=True)
        self._thread.start()
        if not started.wait(STOP_TIMEOUT_S):
            raise RuntimeError("DelayProxy did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every connection, end the loop, join the thread (bounded)."""
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            future.result(STOP_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError("DelayProxy thread did not stop")

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()  # stop accepting first, so no connection starts during teardown
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()  # no lingering FIN handshake: the socket is gone at once
        if self._server is not None:
            # Since 3.12 this also waits for the connections, which is why they go first.
            await asyncio.wait_for(self._server.wait_closed(), STOP_TIMEOUT_S)

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client)
        self.connections_accepted += 1
        writers = [client]
        aborted = False
        try:
            try:
                target_reader, target = await asyncio.open_connection(*self.target)
            except OSError:
                return  # as a refused connection would look to the client: closed at once
            writers.append(target)
            self._writers.add(target)
            await asyncio.gather(
                self._pump(client_reader, target, self.upstream),
                self._pump(target_reader, client, self.downstream),
            )
        except BaseException:
            aborted = True  # stop() or a reset: nothing left worth flushing
            raise
        finally:
            try:
                for writer in writers:
                    # close() flushes the last delivered bytes first; abort() drops them at once.
                    if aborted:
                        writer.transport.abort()
                    else:
                        writer.close()
                if not aborted:
                    with contextlib.suppress(Exception):
                        closing = asyncio.gather(*(w.wait_closed() for w in writers))
                        await asyncio.wait_for(closing, STOP_TIMEOUT_S)
                self._writers.difference_update(writers)
            finally:
                self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def receive() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK_BYTES)
                except OSError:
                    data = b""
                await queue.put((link.delivery_time(loop.time(), len(data)), data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:  # the sender closed its side: pass the half-close on, late too
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                link.bytes_forwarded += len(data)
                await writer.drain()

        receiver = asyncio.ensure_future(receive())
        try:
            await deliver()
        except OSError:
            writer.transport.abort()  # the far side reset: end the connection, as a real link would
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
