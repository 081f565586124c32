"""Run a real Pomona cluster for a test: ``pomona up`` on loopback with ports chosen at run time,
a gRPC client, and ``pomona down`` afterwards — asserting that no process outlives the test, even
when the test fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import yaml

from pomona import auth
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2

POMONA = [sys.executable, "-m", "pomona.cli"]
UP_TIMEOUT_S = 300


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_token_file(directory: Path, token: str = "test-cluster-token") -> Path:
    """A token file for `auth.token_file` and for workers started by hand (`--token-file`)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cluster-token"
    auth.write_token(path, token)
    return path


def manual_worker_command(port: int, token_file: Path) -> list[str]:
    """`python -m worker` as a person runs it for a `launch: manual` node."""
    return [sys.executable, "-m", "worker", "--host", "127.0.0.1", "--port", str(port),
            "--token-file", str(token_file)]


def wait_for_worker(port: int, token_file: Path, timeout_s: float = 120) -> None:
    """Until a worker started by hand answers (a manual node gets only seconds at `up`)."""
    node_secrets = auth.NodeSecrets(auth.read_token(token_file))
    with auth.channel(f"127.0.0.1:{port}", CHANNEL_OPTIONS, node_secrets) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)


def pomona(*args: str, cwd: Path, timeout_s: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*POMONA, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s
    )


def write_cluster_yaml(
    directory: Path,
    model: str | Path,
    node_count: int,
    stages: Sequence[tuple[int, int]] | None = None,
    experts: Sequence[dict] | None = None,
    node_overrides: Sequence[dict] | None = None,
    **extra,
) -> Path:
    ports = free_ports(node_count + 2)  # the last: the HTTP API
    names = [chr(ord("a") + i) for i in range(node_count)]
    config = {
        "model": str(model),
        "coordinator": {"host": "127.0.0.1", "port": ports[0]},
        "nodes": [
            {"name": name, "host": "127.0.0.1", "port": port}
            for name, port in zip(names, ports[1:-1])
        ],
        **extra,
    }
    if "api" not in extra:
        config["api"] = {"host": "127.0.0.1", "port": ports[-1]}
    for node, override in zip(config["nodes"], node_overrides or ()):
        node.update({k: v for k, v in override.items() if k != "name"})
    if stages is not None:
        config["placement"] = {
            "stages": [{"node": n, "layers": list(r)} for n, r in zip(names, stages)]
        }
    if experts is not None:
        config.setdefault("placement", {})["experts"] = list(experts)
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class ClusterClient:
    directory: Path
    stub: coordinator_pb2_grpc.CoordinatorStub
    up_output: str

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 16,
        raw: bool = False,
        ignore_eos: bool = True,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        **sampling,
    ) -> coordinator_pb2.GenerateSummary:
        params = worker_pb2.SamplingParams(temperature=temperature, **sampling)
        if seed is not None:
            params.seed = seed
        request = coordinator_pb2.GenerateRequest(
            prompt=prompt, raw=raw, max_tokens=max_tokens, sampling=params,
            ignore_eos=ignore_eos, stop=list(stop),
        )
        chunks = list(self.stub.Generate(request, timeout=600))
        return chunks[-1].summary

    def node_secrets(self) -> auth.NodeSecrets:
        """What a client of this cluster shows: its token (and TLS files)."""
        return auth.state_secrets(self.directory / ".pomona", cluster_state(self.directory).get("tls"))

    def expert_stats(self) -> coordinator_pb2.ClusterExpertStats:
        return self.stub.GetExpertStats(coordinator_pb2.ExpertStatsQuery(), timeout=20)

    def wait_until_idle(self, timeout_s: float = 10.0) -> bool:
        """Whether every stage freed its requests within `timeout_s` (an end or cancel message
        travels the ring after the last token reaches the client)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(s.active_requests == 0 for s in self.status().stages):
                return True
            time.sleep(0.05)
        return all(s.active_requests == 0 for s in self.status().stages)

    def status(self) -> coordinator_pb2.ClusterStatus:
        return self.stub.GetStatus(
            coordinator_pb2.ClusterStatusRequest(include_workers=True), timeout=10
        )


def cluster_state(directory: Path) -> dict:
    try:
        return json.loads((directory / ".pomona" / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}


def cluster_pids(directory: Path) -> list[int]:
    """The coordinator's and its workers' pids (SSH workers' too: in tests their host is this one)."""
    state = cluster_state(directory)
    if not state:
        return []
    remote = [w["remote_pid"] for w in state.get("remote_workers", {}).values() if w["remote_pid"]]
    return [state["pid"], *(w["pid"] for w in state.get("local_workers", {}).values()), *remote]


def coordinator_channel(directory: Path) -> grpc.Channel:
    """An authenticated channel to the cluster `pomona up` started in `directory` (the CLI's way:
    the token in .pomona/token, the TLS files cluster.json names)."""
    state = cluster_state(directory)
    node_secrets = auth.state_secrets(directory / ".pomona", state.get("tls"))
    return auth.channel(state["address"], CHANNEL_OPTIONS, node_secrets)


def assert_all_gone(pids: Sequence[int], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if is_running(p)]
        time.sleep(0.1)
    for pid in alive:  # never leave a process behind, even on failure
        psutil.Process(pid).kill()
    assert not alive, f"processes outlived `pomona down`: {alive}"


def processes_using(marker: str) -> list[int]:
    """Pids of the processes (other than this one) whose command line contains `marker`."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline and process.info["pid"] != os.getpid():
            found.append(process.info["pid"])
    return found


def is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def running_cluster(
    directory: Path,
    model: str | Path,
    node_count: int,
    stages: Sequence[tuple[int, int]] | None = None,
    experts: Sequence[dict] | None = None,
    node_overrides: Sequence[dict] | None = None,
    **extra,
) -> Iterator[ClusterClient]:
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_cluster_yaml(
        directory, model, node_count, stages, experts, node_overrides, **extra
    )
    pids: list[int] = []
    try:
        up = pomona("up", str(config_path), cwd=directory)
        pids = cluster_pids(directory)
        assert up.returncode == 0, f"pomona up failed:\n{up.stdout}\n{up.stderr}"
        with coordinator_channel(directory) as channel:
            yield ClusterClient(directory, coordinator_pb2_grpc.CoordinatorStub(channel), up.stdout)
    finally:
        pids = pids or cluster_pids(directory)
        pomona("down", cwd=directory, timeout_s=60)
        assert_all_gone(pids)
