"""coordinator.launch: real worker processes started locally and over a real sshd on loopback.

Every test leaves nothing running, even when it fails: workers are stopped in `finally`, anything
still alive is killed by pid, and the pid the worker reported is checked gone within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from coordinator.launch import (
    NodeUnreachable,
    _remote_command,
    _worker_command,
    launch_worker,
    wait_until_reachable,
)
from pomona.auth import NodeSecrets
from pomona.config import NodeConfig, SshConfig
from pomona.errors import PomonaError

REPO_ROOT = Path(__file__).resolve().parent.parent
SSHD = Path("/usr/sbin/sshd")
START_TIMEOUT_S = 60.0  # Python + MLX import on a busy 2-core machine
GONE_TIMEOUT_S = 10.0
SECRETS = NodeSecrets("launch-test-token")  # handed to every worker on its stdin


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_node(name: str, port: int) -> NodeConfig:
    return NodeConfig(name, "127.0.0.1", port, None, "local", None, sys.executable, None, {})


def is_gone(pid: int, timeout_s: float = GONE_TIMEOUT_S) -> bool:
    """True once `pid` has exited (a zombie counts: our container's pid 1 may never reap it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def kill_pid(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def test_local_worker_answers_and_stops(tmp_path: Path) -> None:
    node = local_node("a", free_port())

    async def scenario() -> int:
        process = await launch_worker(node, tmp_path, SECRETS)
        assert process is not None
        try:
            info = await wait_until_reachable(node, START_TIMEOUT_S, SECRETS, process)
            assert process.exit_code() is None
            assert "listening" in process.log_tail()
        finally:
            await process.stop()
        assert process.exit_code() is not None
        await process.stop()  # idempotent
        return info.pid

    pid = asyncio.run(scenario())
    assert pid > 0 and pid != os.getpid()
    assert is_gone(pid), f"worker pid {pid} still running after stop()"
    assert (tmp_path / "a.log").exists()


# Launches one worker (locally, or over SSH when given an SSH port and key), prints its pid, waits.
LAUNCHER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from coordinator.launch import launch_worker, wait_until_reachable
    from pomona.auth import NodeSecrets
    from pomona.config import NodeConfig, SshConfig
    SECRETS = NodeSecrets("launcher-token")

    async def main(port, log_dir, ssh_port=None, key_file=None, user=None, workdir=None):
        python, launch = sys.executable, "ssh" if ssh_port else "local"
        ssh = SshConfig(user, int(ssh_port), key_file, None) if ssh_port else None
        node = NodeConfig("orphan", "127.0.0.1", int(port), None, launch, ssh, python, workdir, {})
        process = await launch_worker(node, Path(log_dir), SECRETS)
        info = await wait_until_reachable(node, 60, SECRETS, process)
        print(info.pid, flush=True)
        await asyncio.sleep(600)  # until the test kills us

    asyncio.run(main(*sys.argv[1:]))
    """
)


def kill_launcher_and_wait(*extra_args: str, log_dir: Path) -> None:
    """Run LAUNCHER, SIGKILL it once its worker answers; the worker must then exit by itself."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(free_port()), str(log_dir), *extra_args],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    worker_pid = None
    try:
        ready, _, _ = select.select([launcher.stdout], [], [], START_TIMEOUT_S)
        line = launcher.stdout.readline() if ready else b""
        assert line.strip().isdigit(), f"launcher printed no worker pid: {line!r}"
        worker_pid = int(line)
        launcher.send_signal(signal.SIGKILL)  # no chance to stop() anything
        launcher.wait(timeout=10)
        assert is_gone(worker_pid), "worker outlived its launcher (stdin EOF did not stop it)"
    finally:
        kill_pid(launcher.pid if launcher.poll() is None else None)
        launcher.wait(timeout=10)
        launcher.stdout.close()
        kill_pid(worker_pid)


def test_worker_exits_when_its_launcher_is_killed(tmp_path: Path) -> None:
    kill_launcher_and_wait(log_dir=tmp_path)


def test_manual_node_on_closed_port_is_unreachable() -> None:
    port = free_port()
    node = NodeConfig("b", "127.0.0.1", port, None, "manual", None, None, None, {})
    started = time.monotonic()
    assert asyncio.run(launch_worker(node, Path("/nonexistent"), SECRETS)) is None
    with pytest.raises(NodeUnreachable) as caught:
        asyncio.run(wait_until_reachable(node, 2, SECRETS))
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "'b'" in message and f"127.0.0.1:{port}" in message and "within 2 s" in message


def test_port_in_use_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(NodeUnreachable) as caught:
            asyncio.run(launch_worker(local_node("c", port), tmp_path, SECRETS))
        assert time.monotonic() - started < 2
        assert "'c'" in str(caught.value) and f"port {port}" in str(caught.value)


def test_worker_that_exits_early_fails_at_once_with_its_log(tmp_path: Path) -> None:
    # The port is free when launch_worker checks it, then taken before the worker (still importing
    # MLX) binds it: the worker exits, and the wait must say so instead of running out its timeout.
    port = free_port()
    node = local_node("d", port)

    async def scenario() -> None:
        process = await launch_worker(node, tmp_path, SECRETS)
        try:
            with socket.socket() as holder:
                holder.bind(("127.0.0.1", port))
                holder.listen()
                started = time.monotonic()
                with pytest.raises(NodeUnreachable) as caught:
                    await wait_until_reachable(node, START_TIMEOUT_S, SECRETS, process)
                assert time.monotonic() - started < START_TIMEOUT_S / 2
        finally:
            await process.stop()
        message = str(caught.value)
        assert "'d'" in message and "exited with code" in message
        assert "bind" in message and f"127.0.0.1:{port}" in message  # from the worker's log

    asyncio.run(scenario())


# Stands in for python: prints its pid, then ignores its arguments and its stdin.
STUBBORN = "#!/bin/sh\necho $$\nexec sleep 600\n"


def stubborn_python(directory: Path) -> str:
    script = directory / "stubborn.sh"
    script.write_text(STUBBORN)
    script.chmod(0o755)
    return str(script)


async def stubborn_pid(process) -> int:
    """The stand-in's pid, from the first line of its log."""
    for _ in range(200):
        if (last_line := process.log_tail(1).strip()).isdigit():
            return int(last_line)
        await asyncio.sleep(0.05)
    raise AssertionError(f"stand-in wrote no pid: {process.log_tail()!r}")


def test_stop_kills_a_worker_that_ignores_eof(tmp_path: Path) -> None:
    node = local_node("e", free_port())
    node = NodeConfig(**{**vars(node), "python": stubborn_python(tmp_path)})

    async def scenario() -> int:
        process = await launch_worker(node, tmp_path, SECRETS)
        pid = None
        try:
            pid = await stubborn_pid(process)
        finally:
            started = time.monotonic()
            await process.stop(timeout_s=0.5)
            assert time.monotonic() - started < 5
            kill_pid(pid if pid is not None and not is_gone(pid, 1) else None)
        assert process.exit_code() == -signal.SIGKILL
        return pid

    assert is_gone(asyncio.run(scenario()))


# --- SSH ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A private sshd on a free loopback port; yields (port, authorized client key, other key)."""
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server not installed (/usr/sbin/sshd; apt-get install openssh-server)")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    directory = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)],
            check=True,
            timeout=30,
        )
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPidFile {directory / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n"
    )
    log_path = directory / "sshd.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert server.poll() is None, f"sshd exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"sshd did not listen: {log_path.read_text()}"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port, directory / "client_key", directory / "other_key"
    finally:
        sessions = []
        with contextlib.suppress(psutil.Error):  # nothing may keep us from stopping sshd
            sessions = psutil.Process(server.pid).children(recursive=True)
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        for session in sessions:
            kill_pid(session.pid)
        assert server.poll() is not None, "sshd still running"


def ssh_node(name: str, worker_port: int, ssh_port: int, key_file: Path | None) -> NodeConfig:
    ssh = SshConfig(getpass.getuser(), ssh_port, str(key_file) if key_file else None, None)
    return NodeConfig(
        name, "127.0.0.1", worker_port, None, "ssh", ssh, sys.executable, str(REPO_ROOT),
        {"POMONA_TEST": "1"},
    )  # fmt: skip


def test_ssh_worker_answers_and_stops(sshd, tmp_path: Path) -> None:
    ssh_port, client_key, _ = sshd
    node = ssh_node("remote", free_port(), ssh_port, client_key)

    async def scenario() -> int:
        process = await launch_worker(node, tmp_path, SECRETS)
        assert process is not None
        worker_pid = None
        try:
            info = await wait_until_reachable(node, START_TIMEOUT_S, SECRETS, process)
            worker_pid = info.pid
            assert psutil.Process(worker_pid).environ().get("POMONA_TEST") == "1"
            assert psutil.Process(worker_pid).cwd() == str(REPO_ROOT)
        finally:
            await process.stop()
            if worker_pid is not None and not is_gone(worker_pid):
                kill_pid(worker_pid)
                pytest.fail(f"SSH worker pid {worker_pid} still running after stop()")
        assert process.exit_code() == 0
        assert "listening" in process.log_tail()
        return worker_pid

    asyncio.run(scenario())


def test_ssh_stop_kills_a_worker_that_ignores_eof(sshd, tmp_path: Path) -> None:
    ssh_port, client_key, _ = sshd
    node = ssh_node("stubborn", free_port(), ssh_port, client_key)
    node = NodeConfig(**{**vars(node), "python": stubborn_python(tmp_path)})

    async def scenario() -> int:
        process = await launch_worker(node, tmp_path, SECRETS)
        pid = None
        try:
            pid = await stubborn_pid(process)
        finally:
            started = time.monotonic()
            await process.stop(timeout_s=0.5)
            assert time.monotonic() - started < 12
            if pid is not None and not is_gone(pid):
                kill_pid(pid)
                pytest.fail(f"remote stand-in pid {pid} survived stop()")
        assert process.exit_code() is not None
        return pid

    asyncio.run(scenario())


def test_ssh_worker_exits_when_its_launcher_is_killed(sshd, tmp_path: Path) -> None:
    ssh_port, client_key, _ = sshd
    user = getpass.getuser()
    kill_launcher_and_wait(str(ssh_port), str(client_key), user, str(REPO_ROOT), log_dir=tmp_path)


def test_ssh_worker_that_cannot_start_fails_at_once(sshd, tmp_path: Path) -> None:
    ssh_port, client_key, _ = sshd
    node = ssh_node("broken", free_port(), ssh_port, client_key)
    node = NodeConfig(**{**vars(node), "python": "/nonexistent/python"})

    async def scenario() -> None:
        process = await launch_worker(node, tmp_path, SECRETS)
        try:
            with pytest.raises(NodeUnreachable) as caught:
                await wait_until_reachable(node, START_TIMEOUT_S, SECRETS, process)
        finally:
            await process.stop()
        message = str(caught.value)
        assert "'broken'" in message and "exited with code 127" in message
        assert "/nonexistent/python" in message  # the remote shell's complaint, from the log

    asyncio.run(scenario())


def test_ssh_wrong_key_is_unreachable(sshd, tmp_path: Path) -> None:
    ssh_port, _, other_key = sshd
    node = ssh_node("denied", free_port(), ssh_port, other_key)
    with pytest.raises(NodeUnreachable) as caught:
        asyncio.run(launch_worker(node, tmp_path, SECRETS))
    message = str(caught.value)
    assert "'denied'" in message and f"@127.0.0.1:{ssh_port}" in message
    assert "authorized_keys" in message


def test_ssh_closed_port_is_unreachable(tmp_path: Path) -> None:
    closed_port = free_port()
    node = ssh_node("far", free_port(), closed_port, None)
    started = time.monotonic()
    with pytest.raises(NodeUnreachable) as caught:
        asyncio.run(launch_worker(node, tmp_path, SECRETS))
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "'far'" in message and f"127.0.0.1:{closed_port}" in message
    assert "sshd" in message
    assert isinstance(caught.value, PomonaError)


def test_remote_command_quotes_and_keeps_the_worker_pid() -> None:
    ssh = SshConfig("me", 22, None, None)
    node = NodeConfig(
        "n", "10.0.0.2", 5000, None, "ssh", ssh, "~/venv/bin/python", "~/my pomona", {"A": "x y"}
    )
    assert _remote_command(node, _worker_command(node, 4096)) == (
        "echo \"pomona: worker pid $$ started $(ps -o lstart= -p $$)\"; cd ~/'my pomona' && exec env 'A=x y' "
        "~/venv/bin/python -m worker --host 10.0.0.2 --port 5000 --exit-on-stdin-eof "
        "--secrets-stdin --max-message-bytes 4096"
    )
