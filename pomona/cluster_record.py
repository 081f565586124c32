"""The running cluster's record, `.pomona/cluster.json`, and stopping what it names.

The coordinator writes the record (its pid, and its local workers' pids, each with its create
time); the CLI reads it. A recorded pid is treated as the recorded process only while its create
time still matches: a pid the OS has given to an unrelated process since is never signalled.
SSH workers' pids are their own hosts' and are never signalled from here.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import psutil

from pomona import auth
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.proto import coordinator_pb2, coordinator_pb2_grpc

STOP_TIMEOUT_S = 20.0


def process_identity(pid: int) -> dict:
    """What `pomona down` checks before it signals `pid`: the process's create time."""
    try:
        return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "create_time": None}  # gone already: nothing to stop


def recorded_state(state_dir: Path) -> dict | None:
    try:
        state = json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def running_state(state_dir: Path) -> dict | None:
    """The running cluster's record; None when there is none or its coordinator is gone (its
    pid may now belong to an unrelated process)."""
    state = recorded_state(state_dir)
    return state if state is not None and same_process(state) else None


def same_process(identity: dict) -> bool:
    """True if the recorded pid is still the process that was recorded (same create time)."""
    try:
        process = psutil.Process(int(identity["pid"]))
        alive = process.status() != psutil.STATUS_ZOMBIE
        # A small tolerance: the time is derived from the boot time, which the kernel may adjust.
        return alive and abs(float(identity["create_time"]) - process.create_time()) < 0.05
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _wait_gone(identities: list[dict], timeout_s: float) -> list[dict]:
    """The recorded processes still running (the same processes) after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = [i for i in identities if same_process(i)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [i for i in alive if same_process(i)]
    return alive


def stop_everything(state: dict, state_dir: Path, node_secrets: auth.NodeSecrets | None) -> bool:
    """Ask the coordinator to stop (it stops its workers: local ones through their stdin, SSH
    ones through their SSH channel); then make sure it and its local workers are gone, signalling
    only processes whose create time matches the record. SSH workers are never signalled from
    here: their pids are another host's; they exit when the coordinator's channel closes.
    True if the coordinator itself had to be killed (it may have left SSH workers behind)."""
    if node_secrets is not None:
        with auth.channel(state["address"], CHANNEL_OPTIONS, node_secrets) as channel:
            try:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                stub.StopCluster(coordinator_pb2.StopClusterRequest(), timeout=5)
            except grpc.RpcError:
                pass
    identities = [state, *state.get("local_workers", {}).values()]
    left = _wait_gone(identities, STOP_TIMEOUT_S)
    for identity in left:
        if same_process(identity):  # checked again right before the signal
            try:
                os.kill(identity["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    _wait_gone(identities, 5)
    (state_dir / "cluster.json").unlink(missing_ok=True)
    (state_dir / auth.TOKEN_FILE).unlink(missing_ok=True)
    return any(identity is state for identity in left)
