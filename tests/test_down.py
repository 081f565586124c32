"""`pomona down` signals only the processes `up` started on this machine, and only while they are
the same processes (create time): never a process whose pid an SSH worker has on its own host,
never an unrelated process that reused a recorded pid."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cluster_helpers import assert_all_gone, cluster_state, is_running, pomona, running_cluster
from layouts import LAYOUTS, PROMPT
from test_launch import sshd  # noqa: F401  (the private sshd fixture)
from tiny_models import reference_generate

from pomona.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 6


@pytest.fixture
def bystanders():
    """Unrelated processes of this machine, standing in for whatever reused a recorded pid."""
    started = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]) for _ in range(3)]
    # A process is told from a reused pid by its start time, which `ps -o lstart=` gives to the
    # second: a stand-in started in the same second as the worker it poses as would pass for it
    # (a real reuse comes after that worker died, never in its first second). Start apart.
    time.sleep(1.1)
    yield [p.pid for p in started]
    for process in started:
        process.kill()
        process.wait(timeout=10)


def _record(directory: Path, state: dict) -> None:
    (directory / ".pomona").mkdir(parents=True, exist_ok=True)
    (directory / ".pomona" / "cluster.json").write_text(json.dumps(state))


def test_down_leaves_a_process_that_reused_a_recorded_pid(tmp_path, bystanders):
    coordinator, worker, remote = bystanders
    stale = lambda pid: {"pid": pid, "create_time": psutil.Process(pid).create_time() - 3600}  # noqa: E731
    _record(tmp_path, {
        **stale(coordinator), "address": "127.0.0.1:1", "config": "cluster.yaml",
        "local_workers": {"a": stale(worker)},
        "remote_workers": {"b": {"host": "10.0.0.2", "remote_pid": remote}},
        "tls": None,
    })
    generate = pomona("generate", "hello", cwd=tmp_path, timeout_s=60)
    assert generate.returncode != 0 and "no cluster is running here" in generate.stderr
    down = pomona("down", cwd=tmp_path, timeout_s=60)
    assert down.returncode == 0, down.stderr
    assert "stale record" in down.stdout
    assert all(is_running(pid) for pid in bystanders), "down signalled an unrelated process"
    assert not (tmp_path / ".pomona" / "cluster.json").exists()


def test_down_stops_an_ssh_worker_through_its_channel_not_by_its_pid(sshd, family_checkpoints, tmp_path, bystanders):  # noqa: F811,E501
    ssh_port, client_key, _ = sshd
    path = family_checkpoints["llama"]
    expected = reference_generate(path, load_tokenizer(path).encode(PROMPT), NEW_TOKENS)
    ssh = {"user": getpass.getuser(), "port": ssh_port, "key_file": str(client_key), "known_hosts": None}
    remote = {"launch": "ssh", "ssh": ssh, "python": sys.executable, "workdir": str(REPO_ROOT)}
    directory = tmp_path / "c"
    pids = []
    with running_cluster(directory, path, 2, LAYOUTS["llama"][2], node_overrides=[{}, remote]) as cluster:
        assert list(cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS).token_ids) == expected
        state = cluster_state(directory)
        assert set(state["local_workers"]) == {"a"} and set(state["remote_workers"]) == {"b"}
        ssh_worker = state["remote_workers"]["b"]["remote_pid"]  # on loopback, a pid here too
        pids = [state["pid"], state["local_workers"]["a"]["pid"], ssh_worker]
        assert "--secrets-stdin" in psutil.Process(ssh_worker).cmdline()
        # Make the SSH worker's recorded pid that of an unrelated local process, as a pid of
        # another host may well be: `down` must not touch it.
        state["remote_workers"]["b"]["remote_pid"] = bystanders[0]
        _record(directory, state)
        down = pomona("down", cwd=directory, timeout_s=60)
        assert down.returncode == 0 and "cluster stopped" in down.stdout, down.stderr
    assert_all_gone(pids)
    assert is_running(bystanders[0]), "down signalled a local process by an SSH worker's pid"


def test_down_after_the_coordinator_was_killed(sshd, family_checkpoints, tmp_path, bystanders):  # noqa: F811
    """With the coordinator SIGKILLed, its local workers (stdin) and SSH workers (channel) exit
    by themselves; `down` clears the record and signals nothing it cannot vouch for."""
    ssh_port, client_key, _ = sshd
    ssh = {"user": getpass.getuser(), "port": ssh_port, "key_file": str(client_key), "known_hosts": None}
    remote = {"launch": "ssh", "ssh": ssh, "python": sys.executable, "workdir": str(REPO_ROOT)}
    directory = tmp_path / "c"
    with running_cluster(directory, family_checkpoints["llama"], 2, LAYOUTS["llama"][2],
                         node_overrides=[{}, remote]):
        state = cluster_state(directory)
        pids = [state["pid"], state["local_workers"]["a"]["pid"], state["remote_workers"]["b"]["remote_pid"]]
        state["remote_workers"]["b"]["remote_pid"] = bystanders[0]
        _record(directory, state)
        psutil.Process(state["pid"]).kill()
        assert_all_gone(pids, timeout_s=30)
        down = pomona("down", cwd=directory, timeout_s=60)
        assert down.returncode == 0 and "stale record" in down.stdout, down.stdout + down.stderr
    assert all(is_running(pid) for pid in bystanders)


# Stands in for the node's python: runs the real worker, but on a stdin of its own (the secrets
# line copied into a pipe it holds open), so it ignores the end of its SSH channel. exec keeps
# the pid the remote shell reported.
DEAF_PYTHON = """#!/bin/sh
exec {python} -c '
import os, sys
line = sys.stdin.buffer.readline()
read, write = os.pipe()
os.write(write, line)
os.dup2(read, 0)
os.set_inheritable(write, True)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
' "$@"
"""


def test_down_kills_an_ssh_worker_that_outlived_its_coordinator(sshd, family_checkpoints, tmp_path):  # noqa: F811
    ssh_port, client_key, _ = sshd
    deaf = tmp_path / "deaf-python"
    deaf.write_text(DEAF_PYTHON.format(python=sys.executable))
    deaf.chmod(0o755)
    ssh = {"user": getpass.getuser(), "port": ssh_port, "key_file": str(client_key), "known_hosts": None}
    remote = {"launch": "ssh", "ssh": ssh, "python": str(deaf), "workdir": str(REPO_ROOT)}
    directory = tmp_path / "c"
    with running_cluster(directory, family_checkpoints["llama"], 2, LAYOUTS["llama"][2],
                         node_overrides=[{}, remote]):
        state = cluster_state(directory)
        ssh_worker = state["remote_workers"]["b"]["remote_pid"]
        assert state["remote_workers"]["b"]["remote_start"]
        psutil.Process(state["pid"]).kill()
        assert_all_gone([state["pid"], state["local_workers"]["a"]["pid"]], timeout_s=30)
        time.sleep(2)
        assert is_running(ssh_worker), "the stand-in should have ignored the end of its channel"
        down = pomona("down", cwd=directory, timeout_s=60)
        assert down.returncode == 0, down.stderr
        assert "stopped the leftover worker of node 'b'" in down.stdout, down.stdout + down.stderr
        assert_all_gone([ssh_worker], timeout_s=10)
