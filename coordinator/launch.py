"""Starting, watching and stopping worker processes: on this machine, over SSH, or not at all.

A node's `launch` mode decides how its worker starts:
- local: a child process `python -m worker ... --exit-on-stdin-eof` whose stdin we hold;
- ssh: the same command in an SSH session (asyncssh) whose stdin we hold;
- manual: someone else runs it; we only wait until it answers.
Holding the worker's stdin is its lifeline: when the coordinator goes away, even SIGKILLed, the pipe
(or SSH channel) closes, the worker reads EOF and exits, so no worker outlives its coordinator.
Each launched worker's output goes to `<log_dir>/<node name>.log`; error messages quote its end.

Every wait here is bounded. A WorkerProcess belongs to the event loop that launched it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import logging
import os
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import asyncssh
import grpc

from pomona import auth
from pomona.errors import PomonaError
from pomona.grpc_options import CHANNEL_OPTIONS, DEFAULT_WORKER_MESSAGE_BYTES
from pomona.proto import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:  # only for hints: any object with NodeConfig's attributes works
    from pomona.config import NodeConfig

log = logging.getLogger(__name__)

SSH_CONNECT_TIMEOUT_S = 10.0
# One Describe attempt: short, so a worker that exits early is noticed within about this long.
DESCRIBE_TRY_TIMEOUT_S = 1.0
RETRY_INTERVAL_S = 0.2
KILL_WAIT_S = 5.0  # how long to wait for a process after killing it
_LOG_TAIL_BYTES = 64 * 1024


class NodeUnreachable(PomonaError):
    """A node's worker could not be started, or does not answer."""


class WorkerProcess:
    """A worker this coordinator started; `stop()` it when done (stdin EOF is only the backstop)."""

    def __init__(self, node: NodeConfig, log_path: Path) -> None:
        self.node = node
        self.log_path = log_path

    # The pid of a worker on this machine (a child of ours), for `pomona down`; None over SSH,
    # whose pids are the remote host's and must never be signalled here.
    local_pid: int | None = None

    def exit_code(self) -> int | None:
        """The worker's exit status (negative: killed by that signal); None while it runs."""
        raise NotImplementedError

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of the worker's output ("" if there is none yet)."""
        try:
            with open(self.log_path, "rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(0, size - _LOG_TAIL_BYTES))
                text = file.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Close the worker's stdin, wait up to `timeout_s` for it to exit, then kill it.

        Idempotent and never raises: it runs in teardown paths, where an error of its own would
        hide the one that caused the teardown.
        """
        try:
            await self._stop(timeout_s)
        except Exception as error:
            log.warning("node %r: stopping its worker failed: %s", self.node.name, error)
        finally:
            self._abandon()  # also runs if we are cancelled mid-stop

    async def _stop(self, timeout_s: float) -> None:
        raise NotImplementedError

    def _abandon(self) -> None:
        """Synchronously make sure nothing is left running (kill, close)."""
        raise NotImplementedError


class _LocalWorker(WorkerProcess):
    def __init__(self, node: NodeConfig, log_path: Path, process: asyncio.subprocess.Process) -> None:
        super().__init__(node, log_path)
        self._process = process
        self.local_pid = process.pid

    def exit_code(self) -> int | None:
        return self._process.returncode

    async def _stop(self, timeout_s: float) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()  # EOF: the worker shuts its server down cleanly
        try:
            await asyncio.wait_for(self._process.wait(), timeout_s)
        except TimeoutError:
            log.warning("node %r: worker ignored EOF for %g s; killing it", self.node.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await asyncio.wait_for(self._process.wait(), KILL_WAIT_S)

    def _abandon(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()


class _SshWorker(WorkerProcess):
    def __init__(
        self,
        node: NodeConfig,
        log_path: Path,
        connection: asyncssh.SSHClientConnection,
        process: asyncssh.SSHClientProcess,
        log_file: BinaryIO,
    ) -> None:
        super().__init__(node, log_path)
        self._connection = connection
        self._process = process
        # Done once the remote output has ended and the channel closed: the log is then complete,
        # so an exit reported by exit_code() always comes with the worker's last words.
        # From the command's first line, for _kill_remote: the remote pid and its start time
        # (`ps -o lstart=`), which exec keeps, so a reused pid is never killed.
        self._remote_pid: int | None = None
        self._remote_start = b""
        self._watch = asyncio.create_task(self._copy_output(log_file))

    async def _copy_output(self, log_file: BinaryIO) -> None:
        try:
            first_line = await self._process.stdout.readline()
            if match := re.fullmatch(rb"pomona: worker pid (\d+) started (.*)\n", first_line):
                self._remote_pid, self._remote_start = int(match[1]), match[2]
            chunk = first_line
            while chunk:
                log_file.write(chunk)
                log_file.flush()  # log_tail() reads the file while we write it
                chunk = await self._process.stdout.read(65536)
            await self._process.wait_closed()
        except (OSError, asyncssh.Error) as error:
            log.warning("node %r: lost the SSH session: %s", self.node.name, error)
        finally:
            log_file.close()

    @property
    def remote_identity(self) -> tuple[int, str] | None:
        """(pid, start time) of the worker on its host, once its first line came."""
        if self._remote_pid is None:
            return None
        return self._remote_pid, self._remote_start.decode(errors="replace")

    def exit_code(self) -> int | None:
        if not self._watch.done():
            return None
        code = self._process.returncode
        return -1 if code is None else code  # no status: the connection was lost

    async def _stop(self, timeout_s: float) -> None:
        if not self._watch.done():
            with contextlib.suppress(OSError, asyncssh.Error):
                self._process.stdin.write_eof()  # sshd closes the worker's stdin: it exits
            done, _ = await asyncio.wait({self._watch}, timeout=timeout_s)
            if not done:
                log.warning("node %r: worker ignored EOF for %g s; killing it", self.node.name, timeout_s)
                await self._kill_remote()
                await asyncio.wait({self._watch}, timeout=KILL_WAIT_S)
        self._connection.close()
        await asyncio.wait_for(self._connection.wait_closed(), KILL_WAIT_S)

    async def _kill_remote(self) -> None:
        # Not an SSH signal request: OpenSSH refuses those for root logins and before 7.9.
        if self.remote_identity is not None:
            with contextlib.suppress(OSError, asyncssh.Error, TimeoutError):
                command = _identity_checked_kill(*self.remote_identity)
                await asyncio.wait_for(self._connection.run(command), KILL_WAIT_S)

    def _abandon(self) -> None:
        # Closing the session is an EOF for the worker too, whatever state we are in.
        self._watch.cancel()
        self._process.close()
        self._connection.close()


def _identity_checked_kill(pid: int, started: str) -> str:
    """A shell command that SIGKILLs `pid` only if it is still the process started at `started`."""
    return f'[ "$(ps -o lstart= -p {pid})" = {shlex.quote(started)} ] && kill -KILL {pid}'


async def kill_remote_worker(node: NodeConfig, pid: int, started: str) -> bool:
    """For `pomona down` when the coordinator is gone: over a new SSH session, SIGKILL a worker
    left on `node`'s host (it ignored its channel's end) if `pid` is still the process that
    started at `started`. True if it was killed."""
    connection, target = await _ssh_connect(node)
    try:
        result = await asyncio.wait_for(connection.run(_identity_checked_kill(pid, started)), KILL_WAIT_S)
        return result.exit_status == 0
    except (OSError, asyncssh.Error) as error:  # TimeoutError is an OSError
        raise NodeUnreachable(f"node {node.name!r}: the kill over SSH on {target} failed: {error}") from None
    finally:
        connection.close()


async def launch_worker(
    node: NodeConfig,
    log_dir: Path,
    node_secrets: auth.NodeSecrets,
    max_message_bytes: int = DEFAULT_WORKER_MESSAGE_BYTES,
) -> WorkerProcess | None:
    """Start `node`'s worker as its `launch` mode says; None for "manual" (nothing to start).

    The worker gets `node_secrets` as the first line of its stdin (the pipe, or the SSH channel):
    never on its command line, where `ps` would show them. Returns once the process is started,
    not once it answers: see `wait_until_reachable`.
    """
    if node.launch == "manual":
        return None
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (re.sub(r"[^\w.-]", "_", node.name) + ".log")
    command = _worker_command(node, max_message_bytes)
    if node.launch == "local":
        return await _launch_local(node, log_path, command, node_secrets.to_line())
    if node.launch == "ssh":
        return await _launch_ssh(node, log_path, command, node_secrets.to_line())
    raise PomonaError(f"node {node.name!r}: unknown launch mode {node.launch!r}; use local, ssh or manual")


def _worker_command(node: NodeConfig, max_message_bytes: int) -> list[str]:
    """The worker's arguments after the interpreter (which depends on where it runs)."""
    return ["-m", "worker", "--host", node.host, "--port", str(node.port), "--exit-on-stdin-eof",
            "--secrets-stdin", "--max-message-bytes", str(max_message_bytes)]


async def _launch_local(
    node: NodeConfig, log_path: Path, args: list[str], secrets_line: bytes
) -> WorkerProcess:
    _check_port_free(node)
    command = [node.python or sys.executable, *args]
    log.info("node %r: starting %s (log: %s)", node.name, shlex.join(command), log_path)
    with open(log_path, "wb") as log_file:  # the child keeps its own descriptor of it
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=os.environ | dict(node.env),
                cwd=node.workdir or None,
            )
        except OSError as error:
            raise NodeUnreachable(
                f"node {node.name!r}: cannot start its worker ({error}); check the node's "
                "`python` (an interpreter with Pomona installed) and `workdir`"
            ) from None
    worker = _LocalWorker(node, log_path, process)
    process.stdin.write(secrets_line)  # a pipe buffer holds it: no wait for the worker
    return worker


def _check_port_free(node: NodeConfig) -> None:
    """Fail at once if a local worker could not listen on its address.

    The worker would find out itself, but only after seconds of imports; worse, gRPC servers set
    SO_REUSEPORT, so a second worker on a port another gRPC server holds would *share* the port
    and receive half of its calls. This probe sets no SO_REUSEPORT, so any listener blocks it.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            node.host, node.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise NodeUnreachable(
            f"node {node.name!r}: cannot resolve host {node.host!r} "
            f"({error.strerror}); check the node's `host`"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise NodeUnreachable(
                    f"node {node.name!r}: port {node.port} on {node.host} is already in use; "
                    f"stop whatever listens there (an old worker? see `ss -ltnp 'sport = "
                    f":{node.port}'`) or give the node another port"
                ) from None
            raise NodeUnreachable(
                f"node {node.name!r}: cannot listen on {node.address} ({error.strerror}); "
                "launch: local needs an address of this machine, check the node's `host`"
            ) from None


def _shell_path(path: str) -> str:
    # shlex.quote would keep a leading `~` literal; leave it outside the quotes so it expands.
    if path == "~" or path.startswith("~/"):
        return "~/" + shlex.quote(path[2:]) if path[2:] else "~"
    return shlex.quote(path)


def _remote_command(node: NodeConfig, args: list[str]) -> str:
    """`echo pid and start time; cd WORKDIR && exec env K=V ... PYTHON -m worker ...`.

    exec keeps the shell's pid `$$` and start time for the worker, so the echoed pid is the
    worker's: stop() can kill it if it ignores EOF, after checking the start time still matches.
    """
    worker = " ".join([_shell_path(node.python or "python3"), *map(shlex.quote, args)])
    env = " ".join(shlex.quote(f"{key}={value}") for key, value in node.env.items())
    command = f"exec env {env} {worker}" if env else f"exec {worker}"
    command = f"cd {_shell_path(node.workdir)} && {command}" if node.workdir else command
    return f'echo "pomona: worker pid $$ started $(ps -o lstart= -p $$)"; {command}'


async def _ssh_connect(node: NodeConfig) -> tuple[asyncssh.SSHClientConnection, str]:
    """An SSH connection to `node` and how to name it (user@host:port); NodeUnreachable if not."""
    ssh = node.ssh
    if ssh is None:
        raise PomonaError(f"node {node.name!r}: launch is ssh but it has no ssh settings")
    target = f"{ssh.user or getpass.getuser()}@{node.host}:{ssh.port}"
    options: dict = {"port": ssh.port, "known_hosts": ssh.known_hosts}  # None: no host key check
    if ssh.user:
        options["username"] = ssh.user  # unset: ~/.ssh/config's User, else the local user
    if ssh.key_file:
        options["client_keys"] = [ssh.key_file]  # unset: the agent and ~/.ssh's default keys
    try:
        connection = await asyncio.wait_for(
            asyncssh.connect(node.host, connect_timeout=SSH_CONNECT_TIMEOUT_S, **options),
            SSH_CONNECT_TIMEOUT_S + 1,
        )
    except (OSError, asyncssh.Error, ValueError, TimeoutError) as error:
        raise NodeUnreachable(_ssh_failure(node, target, error)) from None
    return connection, target


async def _launch_ssh(
    node: NodeConfig, log_path: Path, args: list[str], secrets_line: bytes
) -> WorkerProcess:
    connection, target = await _ssh_connect(node)
    command = _remote_command(node, args)
    log.info("node %r: running over SSH on %s: %s (log: %s)", node.name, target, command, log_path)
    try:
        process = await asyncio.wait_for(
            connection.create_process(command, stderr=asyncssh.STDOUT, encoding=None),
            SSH_CONNECT_TIMEOUT_S,
        )
    except (OSError, asyncssh.Error, TimeoutError) as error:
        connection.close()
        raise NodeUnreachable(
            f"node {node.name!r}: connected to {target} but could not run the worker there "
            f"({type(error).__name__}: {error}); check that sshd allows running commands"
        ) from None
    process.stdin.write(secrets_line)  # inside the encrypted channel, never on a command line
    return _SshWorker(node, log_path, connection, process, open(log_path, "wb"))


# What to check for each kind of SSH connection failure; the first matching type wins.
_SSH_HINTS: tuple[tuple[Any, str], ...] = (
    (TimeoutError, "check that the host is up and reachable and no firewall blocks the SSH port"),
    (ConnectionRefusedError, "check that sshd runs on the node and listens on `ssh.port`"),
    (socket.gaierror, "check the node's `host` name"),
    (asyncssh.PermissionDenied, "check `ssh.user`, `ssh.key_file` and the node's authorized_keys"),
    (asyncssh.HostKeyNotVerifiable, "ssh there once to trust its key, or set `known_hosts: null`"),
    ((FileNotFoundError, ValueError), "check the `ssh.key_file` and `ssh.known_hosts` files"),
)


def _ssh_failure(node: NodeConfig, target: str, error: BaseException) -> str:
    reason = str(error) or type(error).__name__
    if isinstance(error, TimeoutError):
        reason = f"no answer within {SSH_CONNECT_TIMEOUT_S:g} s"
    hint = next(
        (hint for kind, hint in _SSH_HINTS if isinstance(error, kind)),
        "check the node's `host` and `ssh` settings, and that `ssh` to it works by hand",
    )
    return f"node {node.name!r}: cannot connect over SSH to {target}: {reason}; {hint}"


async def wait_until_reachable(
    node: NodeConfig,
    timeout_s: float,
    node_secrets: auth.NodeSecrets,
    process: WorkerProcess | None = None,
) -> worker_pb2.NodeInfo:
    """Poll the node's `Describe` until it answers; raise NodeUnreachable after `timeout_s`.

    With `process`, fail as soon as it exits (a worker that cannot start never will answer).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last_error = "no answer"
    while True:
        if process is not None and (code := process.exit_code()) is not None:
            raise NodeUnreachable(
                f"node {node.name!r}: its worker exited with code {code} before answering on "
                f"{node.address}; the end of its log {process.log_path}:\n{process.log_tail()}"
            )
        remaining_s = deadline - loop.time()
        if remaining_s <= 0:
            raise NodeUnreachable(_timeout_message(node, timeout_s, last_error, process))
        try:
            # A fresh channel per try: one channel's reconnect backoff grows after refused
            # connections, so a worker that came up late would be noticed late.
            async with auth.aio_channel(node.address, CHANNEL_OPTIONS, node_secrets) as channel:
                return await worker_pb2_grpc.WorkerStub(channel).Describe(
                    worker_pb2.DescribeRequest(), timeout=min(DESCRIBE_TRY_TIMEOUT_S, remaining_s)
                )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:  # it answers, but not to us
                raise NodeUnreachable(
                    f"node {node.name!r} at {node.address} refused the cluster's token: it runs a "
                    "worker of another cluster, or one started by hand with another --token-file "
                    "(give it this cluster's auth.token_file)"
                ) from None
            last_error = error.details() or error.code().name
        await asyncio.sleep(max(0.0, min(RETRY_INTERVAL_S, deadline - loop.time())))


def _timeout_message(
    node: NodeConfig, timeout_s: float, last_error: str, process: WorkerProcess | None
) -> str:
    head = f"node {node.name!r} at {node.address} did not answer within {timeout_s:g} s"
    firewall = f"that no firewall blocks port {node.port}"
    if process is None:
        return (
            f"{head} (last error: {last_error}): check that its worker is running (launch: manual "
            f"means Pomona does not start it: run `pomona worker --host {node.host} --port "
            f"{node.port} --token-file FILE` on that machine, FILE holding the cluster's "
            f"auth.token_file), that host and port are right, and {firewall}"
        )
    return (
        f"{head} although its worker is running (last error: {last_error}): it may still be "
        f"starting, `host` may not reach the node, or a firewall blocks port {node.port}; the end "
        f"of its log {process.log_path}:\n"
        f"{process.log_tail()}"
    )
