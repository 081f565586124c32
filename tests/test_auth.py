"""Every RPC of the coordinator and the workers needs the cluster's token (and, with TLS, a
certificate of the cluster's CA): real clusters on loopback, raw calls on their ports.

The RPCs are enumerated from the proto descriptors, so a new rpc cannot escape the test.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import grpc
import psutil
import pytest
import yaml
from cluster_helpers import (
    cluster_state,
    free_ports,
    pomona,
    running_cluster,
    wait_for_worker,
    write_cluster_yaml,
)
from layouts import LAYOUTS, PROMPT
from tiny_models import reference_generate

from pomona import auth
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.proto import coordinator_pb2, worker_pb2, worker_pb2_grpc
from pomona.tokenizer import load_tokenizer

NEW_TOKENS = 8
SERVICES = [
    service
    for module in (worker_pb2, coordinator_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
]


def _call(channel: grpc.Channel, service, method, metadata) -> None:
    """Call ``method`` with its default request (which would run it: Shutdown, StopCluster...)."""
    path = f"/{service.full_name}/{method.name}"
    payload = b""  # the default instance of every request message serializes to no bytes
    if method.client_streaming:
        requests = iter([payload])
        if method.server_streaming:
            list(channel.stream_stream(path)(requests, timeout=10, metadata=metadata))
        else:
            channel.stream_unary(path)(requests, timeout=10, metadata=metadata)
    elif method.server_streaming:
        list(channel.unary_stream(path)(payload, timeout=10, metadata=metadata))
    else:
        channel.unary_unary(path)(payload, timeout=10, metadata=metadata)


def _refusals(address: str, service, metadata) -> dict[str, grpc.StatusCode | None]:
    with grpc.insecure_channel(address) as channel:
        codes = {}
        for method in service.methods:
            try:
                _call(channel, service, method, metadata)
                codes[method.name] = None
            except grpc.RpcError as error:
                codes[method.name] = error.code()
                assert "pomona-token" in error.details(), error.details()
        return codes


def test_every_rpc_refuses_a_missing_or_wrong_token(family_checkpoints, tmp_path):
    path = family_checkpoints["llama"]
    expected = reference_generate(path, load_tokenizer(path).encode(PROMPT), NEW_TOKENS)
    assert {s.name for s in SERVICES} == {"Worker", "Coordinator"}
    with running_cluster(tmp_path, path, 2, LAYOUTS["llama"][2]) as cluster:
        config = yaml.safe_load((tmp_path / "cluster.yaml").read_text())
        addresses = {
            "Coordinator": f"127.0.0.1:{config['coordinator']['port']}",
            "Worker": f"127.0.0.1:{config['nodes'][0]['port']}",
        }
        token = (tmp_path / ".pomona" / "token").read_text().strip()
        for service in SERVICES:
            for metadata in ((), (("pomona-token", token[:-1] + "x"),), (("pomona-token", ""),)):
                codes = _refusals(addresses[service.name], service, metadata)
                assert len(codes) == len(service.methods) >= 4
                assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (service.name, codes)
        # Nothing ran: Shutdown, Release, StopCluster and LoadShard did not happen.
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert list(summary.token_ids) == expected
        assert [s.state for s in cluster.status().stages] == ["ready", "ready"]
        # The right token opens the worker's port too.
        node_secrets = auth.NodeSecrets(token)
        with auth.channel(addresses["Worker"], CHANNEL_OPTIONS, node_secrets) as channel:
            status = worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=10)
            assert status.loaded
        # The token file is the owner's alone, and no process shows the token on its command line.
        mode = stat.S_IMODE(os.stat(tmp_path / ".pomona" / "token").st_mode)
        assert mode == 0o600, oct(mode)
        state = cluster_state(tmp_path)
        for pid in [state["pid"], *(w["pid"] for w in state["local_workers"].values())]:
            assert token not in " ".join(psutil.Process(pid).cmdline())
            assert token not in " ".join(psutil.Process(pid).environ().values())


def test_token_file_and_a_manual_worker(family_checkpoints, tmp_path):
    """`auth.token_file` sets the cluster's token; a manual worker started with it joins, one
    started with another token is refused at bring-up with a clear message."""
    path = family_checkpoints["llama"]
    expected = reference_generate(path, load_tokenizer(path).encode(PROMPT), NEW_TOKENS)
    token_file = tmp_path / "secret"
    token_file.write_text("a-shared-secret-of-this-cluster\n")
    (port,) = free_ports(1)
    worker = subprocess.Popen(
        [sys.executable, "-m", "pomona.cli", "worker", "--host", "127.0.0.1", "--port", str(port),
         "--token-file", str(token_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_worker(port, token_file)
        overrides = [{}, {"port": port, "launch": "manual"}]
        extra = {"auth": {"token_file": str(token_file)}}
        layout = LAYOUTS["llama"][2]
        with running_cluster(tmp_path / "c", path, 2, layout, None, overrides, **extra) as cluster:
            written = (tmp_path / "c" / ".pomona" / "token").read_text().strip()
            assert written == "a-shared-secret-of-this-cluster"
            summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
            assert list(summary.token_ids) == expected
        # The same worker, now under a cluster with another token: refused, named.
        other = tmp_path / "other"
        other.mkdir()
        manual = [{"port": port, "launch": "manual"}]
        config_path = write_cluster_yaml(other, path, 1, node_overrides=manual)
        up = pomona("up", str(config_path), cwd=other, timeout_s=120)
        pomona("down", cwd=other, timeout_s=60)
        assert up.returncode != 0
        assert "node 'a' at 127.0.0.1:" in up.stderr and "refused the cluster's token" in up.stderr, up.stderr
    finally:
        worker.kill()
        worker.wait(timeout=10)


def _make_certs(directory, model) -> None:
    directory.mkdir()
    config_path = write_cluster_yaml(directory, model, 2)
    made = pomona("certs", str(config_path), cwd=directory, timeout_s=60)
    assert made.returncode == 0, made.stderr
    assert "tls: {ca: pomona-certs/ca.pem" in made.stdout


def _describe(address: str, node_secrets: auth.NodeSecrets) -> worker_pb2.NodeInfo:
    with auth.channel(address, CHANNEL_OPTIONS, node_secrets) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=5)


def test_mutual_tls_cluster_matches_and_refuses_clients_without_a_cert(family_checkpoints, tmp_path):
    path = family_checkpoints["llama"]
    with running_cluster(tmp_path / "plain", path, 2, LAYOUTS["llama"][2]) as cluster:
        plain = list(cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS).token_ids)
    assert plain == reference_generate(path, load_tokenizer(path).encode(PROMPT), NEW_TOKENS)

    directory, other = tmp_path / "tls", tmp_path / "other"
    _make_certs(directory, path)
    _make_certs(other, path)  # another CA
    certs = directory / "pomona-certs"
    assert stat.S_IMODE(os.stat(certs / "a-key.pem").st_mode) == 0o600
    tls = {"ca": "pomona-certs/ca.pem", "cert": "pomona-certs/coordinator.pem",
           "key": "pomona-certs/coordinator-key.pem"}
    nodes = [{"tls": {"cert": f"pomona-certs/{n}.pem", "key": f"pomona-certs/{n}-key.pem"}} for n in "ab"]
    with running_cluster(directory, path, 2, LAYOUTS["llama"][2], node_overrides=nodes, tls=tls) as cluster:
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert list(summary.token_ids) == plain
        token = (directory / ".pomona" / "token").read_text().strip()
        config = yaml.safe_load((directory / "cluster.yaml").read_text())
        worker_address = f"127.0.0.1:{config['nodes'][0]['port']}"
        names = ("ca.pem", "coordinator.pem", "coordinator-key.pem")
        ours = auth.TlsPems.from_files(*(certs / f for f in names))
        foreign = other / "pomona-certs"
        theirs = auth.TlsPems.from_files(*(foreign / f for f in ("ca.pem", "a.pem", "a-key.pem")))
        assert _describe(worker_address, auth.NodeSecrets(token, ours)).pid > 0
        for address in (cluster_state(directory)["address"], worker_address):
            # With the token: over plain TCP, with a certificate of another CA, trusting another CA.
            with grpc.insecure_channel(address) as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    worker_pb2_grpc.WorkerStub(channel).Describe(
                        worker_pb2.DescribeRequest(), timeout=5, metadata=(("pomona-token", token),)
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            for pems in (auth.TlsPems(ours.ca, theirs.cert, theirs.key), theirs):
                with pytest.raises(grpc.RpcError) as caught:
                    _describe(address, auth.NodeSecrets(token, pems))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # And the right certificate without the token.
        with pytest.raises(grpc.RpcError) as caught:
            _describe(worker_address, auth.NodeSecrets("not-the-token", ours))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- the pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, problem",
    [
        ((), "carries no token"),
        ((("other", "x"),), "carries no token"),
        ((("pomona-token", "secret-x"),), "carries a wrong token"),
        ((("pomona-token", "secre"),), "carries a wrong token"),  # a prefix is not the token
        ((("pomona-token", "secret"), ("pomona-token", "secret")), "carries a wrong token"),
        ((("pomona-token", b"secret"),), ""),
        ((("pomona-token", "secret"),), ""),
    ],
)
def test_token_check(metadata, problem):
    assert auth._accepts("secret", metadata) == problem


def test_secrets_line_round_trip_and_refusals():
    pems = auth.TlsPems(b"ca", b"cert", b"key")
    for node_secrets in (auth.NodeSecrets("t"), auth.NodeSecrets("t", pems)):
        line = node_secrets.to_line()
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert auth.NodeSecrets.from_line(line) == node_secrets
    for bad in (b"", b"not json\n", b'{"token": ""}\n', b'{"token": 5}\n', b'{"tls": {}}\n'):
        with pytest.raises(auth.AuthError):
            auth.NodeSecrets.from_line(bad)


TLS_CASES = [
    ("tls:\n  ca: ca.pem\n  cert: c.pem\n", "tls: missing required key 'key'"),
    ("tls: {ca: nope.pem, cert: c.pem, key: k.pem}\n", "tls.ca: no such file"),
    ("auth: {token_file: missing}\n", "auth.token_file: no such file"),
]


@pytest.mark.parametrize("extra, expected", TLS_CASES)
def test_auth_and_tls_config_errors(tmp_path, extra, expected):
    from pomona.config import load_cluster_config
    from pomona.errors import ConfigError

    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    (tmp_path / "cluster.yaml").write_text("nodes:\n  - {name: a, host: 127.0.0.1, port: 50051}\n" + extra)
    with pytest.raises(ConfigError) as caught:
        load_cluster_config(tmp_path / "cluster.yaml")
    assert expected in str(caught.value), str(caught.value)


def test_a_node_certificate_needs_the_cluster_ca(tmp_path):
    from pomona.config import load_cluster_config
    from pomona.errors import ConfigError

    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    (tmp_path / "cluster.yaml").write_text(
        "nodes:\n  - {name: a, host: 127.0.0.1, port: 50051, tls: {cert: c.pem, key: k.pem}}\n"
    )
    with pytest.raises(ConfigError, match="needs the top-level `tls: {ca, cert, key}`"):
        load_cluster_config(tmp_path / "cluster.yaml")
    (tmp_path / "ca.pem").write_text("x")
    with open(tmp_path / "cluster.yaml", "a") as file:
        file.write("tls: {ca: ca.pem, cert: c.pem, key: k.pem}\nauth: {token_file: k.pem}\n")
    config = load_cluster_config(tmp_path / "cluster.yaml")
    assert config.tls.ca == str(tmp_path / "ca.pem") and config.nodes[0].tls.cert == str(tmp_path / "c.pem")
    assert config.auth.token_file == str(tmp_path / "k.pem")
