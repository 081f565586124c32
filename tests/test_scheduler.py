"""The measuring scheduler on a heterogeneous cluster emulated with real processes: a node slowed by
a cgroup CPU quota, a link slowed by a user-space delay proxy, power figures from cluster.yaml.
Every placement the scheduler chooses still generates single-process mlx-lm's greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from cluster_helpers import (
    assert_all_gone,
    free_ports,
    manual_worker_command,
    pomona,
    processes_using,
    running_cluster,
    write_token_file,
)
from emulation import DelayProxy, cpu_group, throttle_available, throttled_python
from tiny_models import make_tiny_checkpoint, reference_generate

from pomona import auth
from pomona.modelinfo import describe_model
from pomona.proto import worker_pb2, worker_pb2_grpc
from pomona.tokenizer import load_tokenizer

PROMPT = "Machine learning models run on many machines"
NEW_TOKENS = 8
GIB = 2**30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Wide enough that a layer's compute shows a CPU quota; a short context keeps the KV budget small.
    return make_tiny_checkpoint(
        "llama", tmp_path_factory.mktemp("m") / "llama", num_layers=12, hidden_size=256,
        intermediate_size=1024, max_position_embeddings=256,
    )


def _share_gib(model_dir, fraction: float) -> float:
    """memory_gb that holds `fraction` of the model's weights: no single node can hold it all."""
    return describe_model(str(model_dir)).total_bytes * fraction / GIB


def _stages(status) -> list[tuple[str, int, int]]:
    return [(s.node, s.layer_start, s.layer_end) for s in status.stages if not s.experts_only]


def _own_cache(tmp_path, name: str) -> dict:
    # Nodes on one machine would share one profile cache; a throttled node must measure itself.
    return {"POMONA_CACHE": str(tmp_path / f"cache-{name}")}


needs_cgroups = pytest.mark.skipif(not throttle_available()[0], reason=throttle_available()[1])


@needs_cgroups
def test_a_throttled_node_gets_fewer_layers_and_tokens_match(tmp_path, model_dir):
    expected = reference_generate(model_dir, load_tokenizer(model_dir).encode(PROMPT), NEW_TOKENS)
    memory = _share_gib(model_dir, 0.75)
    with cpu_group(0.3) as slow:
        overrides = [
            {"memory_gb": memory, "env": _own_cache(tmp_path, "a"),
             "python": str(throttled_python(slow.path, tmp_path))},
            {"memory_gb": memory, "env": _own_cache(tmp_path, "b")},
        ]
        with running_cluster(
            tmp_path / "c", model_dir, 2, node_overrides=overrides,
            placement={"objective": "latency"}, generation={"max_context": 256},
        ) as cluster:
            summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
            status = cluster.status()
        assert slow.throttled_count() > 0
    layers = {node: end - start for node, start, end in _stages(status)}
    assert set(layers) == {"a", "b"}
    assert layers["a"] < layers["b"], _stages(status)
    assert list(summary.token_ids) == expected
    assert status.objective == "latency" and status.predicted.decode_tok_s > 0


def test_a_slow_link_is_left_out_and_tokens_match(tmp_path, model_dir):
    expected = reference_generate(model_dir, load_tokenizer(model_dir).encode(PROMPT), NEW_TOKENS)
    memory = _share_gib(model_dir, 0.75)  # any two of the three nodes hold the model
    (port,) = free_ports(1)
    token_file = write_token_file(tmp_path)
    worker = subprocess.Popen(
        manual_worker_command(port, token_file), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with DelayProxy(0, "127.0.0.1", port, 0.020) as link:
            overrides = [
                {"memory_gb": memory}, {"memory_gb": memory},
                {"memory_gb": memory, "port": link.port, "launch": "manual"},
            ]
            with running_cluster(
                tmp_path / "c", model_dir, 3, node_overrides=overrides,
                placement={"objective": "latency"}, generation={"max_context": 256},
                auth={"token_file": str(token_file)},
            ) as cluster:
                summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
                status = cluster.status()
    finally:
        worker.kill()
        worker.wait(timeout=10)
    assert {node for node, _, _ in _stages(status)} == {"a", "b"}
    reasons = {n.node: n.reason for n in status.left_out}
    assert "c" in reasons and "one-way" in reasons["c"], reasons
    assert list(summary.token_ids) == expected


@needs_cgroups
def test_energy_objective_picks_the_frugal_node_latency_the_fast_one(tmp_path, model_dir):
    """`pomona plan` measures and plans without loading: the same cluster, two objectives."""
    with cpu_group(0.5) as slow:
        ports = free_ports(3)
        config = {
            "model": str(model_dir),
            "coordinator": {"host": "127.0.0.1", "port": ports[0]},
            "nodes": [
                {"name": "fast", "host": "127.0.0.1", "port": ports[1],
                 "power": {"idle_w": 40, "max_w": 300}, "env": _own_cache(tmp_path, "fast")},
                {"name": "frugal", "host": "127.0.0.1", "port": ports[2],
                 "power": {"idle_w": 2, "max_w": 20}, "env": _own_cache(tmp_path, "frugal"),
                 "python": str(throttled_python(slow.path, tmp_path))},
            ],
            "generation": {"max_context": 256},
        }
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
        plans = {}
        for objective in ("latency", "energy"):
            result = pomona("plan", "--json", "--objective", objective, cwd=tmp_path, timeout_s=300)
            assert result.returncode == 0, result.stderr
            plans[objective] = json.loads(result.stdout)
    serving = {o: {s["node"] for s in p["chosen"]["stages"]} for o, p in plans.items()}
    assert serving == {"latency": {"fast"}, "energy": {"frugal"}}, serving
    fast, frugal = plans["latency"]["chosen"]["predicted"], plans["energy"]["chosen"]["predicted"]
    assert frugal["j_per_token"] < fast["j_per_token"]
    assert frugal["decode_tok_s"] < fast["decode_tok_s"]
    assert "estimated (cluster.yaml power" in frugal["energy_basis"]
    for name in ("even", "memory", "compute"):
        assert name in plans["energy"]["baselines"]
    # `plan` loads nothing and leaves no worker behind.
    assert_all_gone([pid for p in ports[1:] for pid in processes_using(f"--port {p}")])


def test_links_are_measured_over_the_data_plane_stack(tmp_path):
    """Worker-to-worker MeasureLinks through a 10 ms proxy reports ~10 ms one-way."""
    ports = free_ports(2)
    token_file = write_token_file(tmp_path)
    workers = [
        subprocess.Popen(manual_worker_command(p, token_file),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for p in ports
    ]
    try:
        with DelayProxy(0, "127.0.0.1", ports[1], 0.010) as link:
            node_secrets = auth.NodeSecrets(auth.read_token(token_file))
            channel = auth.channel(f"127.0.0.1:{ports[0]}", [], node_secrets)
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = worker_pb2_grpc.WorkerStub(channel)
            request = worker_pb2.MeasureLinksRequest(
                targets=[
                    worker_pb2.LinkTarget(name="slow", address=f"127.0.0.1:{link.port}"),
                    worker_pb2.LinkTarget(name="direct", address=f"127.0.0.1:{ports[1]}"),
                    worker_pb2.LinkTarget(name="nobody", address=f"127.0.0.1:{free_ports(1)[0]}"),
                ],
                small_bytes=2304, large_bytes=2**20, small_rounds=10, large_rounds=2, timeout_s=5,
            )
            started = time.monotonic()
            reply = stub.MeasureLinks(request, timeout=60)
            assert time.monotonic() - started < 30  # the unreachable target is bounded
            channel.close()
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=10)
    by_target = {m.target: m for m in reply.links}
    assert by_target["slow"].rtt_median_s / 2 >= 0.010
    assert by_target["direct"].rtt_median_s < by_target["slow"].rtt_median_s
    assert by_target["direct"].bandwidth_bytes_per_s > 0
    assert by_target["nobody"].error


def test_status_and_generate_json_carry_the_schedulers_figures(tmp_path, model_dir):
    memory = _share_gib(model_dir, 0.75)  # two stages
    overrides = [{"memory_gb": memory, "power": {"idle_w": 5, "max_w": 50}}] * 2
    with running_cluster(
        tmp_path, model_dir, 2, node_overrides=overrides, generation={"max_context": 256}
    ) as cluster:
        result = pomona("generate", "--json", "--raw", "--max-tokens", "6", "--ignore-eos", PROMPT,
                        cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        generated = json.loads(result.stdout)
        status = json.loads(pomona("status", "--json", cwd=tmp_path).stdout)
        assert "predicted" in cluster.up_output and "bottleneck" in cluster.up_output
        if "measured (" not in cluster.up_output:  # no meter here: the estimate says why
            assert "no power meter (" in cluster.up_output, cluster.up_output
    assert generated["energy_j"] > 0
    assert generated["j_per_token"] == pytest.approx(generated["energy_j"] / 6, rel=1e-3)
    assert generated["energy_source"].startswith("estimated (cluster.yaml power")
    stages = status["stages"]
    assert len(stages) == 2 and status["predicted"]["decode_tok_s"] > 0
    for stage in stages:
        assert stage["predicted_compute_s"] > 0 and stage["measured_compute_s"] > 0
        # the totals behind the average (benchmarks take differences of them): one step a token
        assert int(stage["decode_steps"]) == 6
        assert stage["measured_compute_s"] == pytest.approx(stage["decode_busy_s"] / 6, rel=1e-6)
        assert stage["hop_latency_s"] > 0 and stage["energy_j"] > 0
        assert stage["power_basis"].startswith("estimated (cluster.yaml power")


def test_a_node_that_cannot_be_profiled_in_time_fails_up_clearly(tmp_path, model_dir):
    (port,) = free_ports(1)
    token_file = write_token_file(tmp_path)
    worker = subprocess.Popen(  # its own profile cache: it must measure, not read a stored profile
        manual_worker_command(port, token_file),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "POMONA_CACHE": str(tmp_path / "worker-cache")},
    )
    try:
        # Every message to the node takes 0.3 s: it answers Describe, but not a 1 s profile.
        with DelayProxy(0, "127.0.0.1", port, 0.3) as link:
            ports = free_ports(1)
            config = {
                "model": str(model_dir),
                "coordinator": {"host": "127.0.0.1", "port": ports[0]},
                "nodes": [{"name": "sluggish", "host": "127.0.0.1", "port": link.port,
                           "launch": "manual"}],
                "auth": {"token_file": str(token_file)},
            }
            (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
            result = subprocess.run(
                [sys.executable, "-m", "pomona.cli", "up"], cwd=tmp_path, capture_output=True,
                text=True, timeout=180, env={**os.environ, "POMONA_PROFILE_TIMEOUT_S": "1"},
            )
    finally:
        pomona("down", cwd=tmp_path, timeout_s=60)  # in case it came up after all
        worker.kill()
        worker.wait(timeout=10)
    assert result.returncode != 0
    assert "node 'sluggish' could not be profiled: it did not finish within 1 s" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "reply, node_power, machine, basis, note",
    [
        # a meter measured: its figures win over cluster.yaml
        (dict(power_measured=True, idle_w=4.0, busy_w=30.0, power_meter="rapl"), (5, 50), None,
         "measured (rapl)", ""),
        # the meter failed: cluster.yaml's figures, and the reason travels with them
        (dict(power_measured=False, power_note="rapl: the meter failed while measuring (EIO)"),
         (5, 50), None, "estimated (cluster.yaml power: idle 5 W, max 50 W)",
         "rapl: the meter failed while measuring (EIO)"),
        (dict(power_note="zeus-apple-silicon: not macOS"), None, "mac_mini_2024_m4",
         "estimated (catalogue: mac_mini_2024_m4", "zeus-apple-silicon: not macOS"),
        (dict(), None, None, "estimated (assumed idle 7 W, max 100 W", ""),
    ],
)
def test_power_falls_back_to_the_estimate_and_says_why(reply, node_power, machine, basis, note):
    from coordinator.profiling import power_of
    from pomona.config import NodeConfig, PowerSpec

    node = NodeConfig("n", "127.0.0.1", 1, None, "local", None, None, None, {},
                      PowerSpec(*node_power) if node_power else None, machine)
    power, why = power_of(node, worker_pb2.ProfileReply(**reply))
    assert power.basis.startswith(basis), power.basis
    assert why == note
