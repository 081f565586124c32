"""The mlx-ring transport (`transport: mlx-ring`): stage-to-stage messages on an mx.distributed
ring (MLX's ring backend on loopback) give the tokens of the gRPC path and of single-process
mlx-lm, wait without polling a core, and fail clearly when a stage dies or a layout
needs a ring the workers cannot form."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from cluster_helpers import cluster_pids, free_ports, running_cluster
from layouts import LAYOUTS, PROMPT
from test_dataplane import _kill_while_generating
from tiny_models import make_tiny_checkpoint, reference_generate

from pomona import auth
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.proto import worker_pb2, worker_pb2_grpc
from pomona.tokenizer import load_tokenizer
from worker.ring import FRAME_BYTES

NEW_TOKENS = 12


def _reload_on_a_ring(directory, cluster, path, ring_hosts: list[str]) -> list:
    """Release node a's shard and ask it, directly, to load stage 0 of 2 on the ring of
    ``ring_hosts``: its LoadShard progress messages."""
    nodes = yaml.safe_load((directory / "cluster.yaml").read_text())["nodes"]
    node = next(n for n in nodes if n["name"] == "a")
    with auth.channel(f"{node['host']}:{node['port']}", CHANNEL_OPTIONS, cluster.node_secrets()) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        stub.Release(worker_pb2.ReleaseRequest(), timeout=30)
        request = worker_pb2.LoadShardRequest(
            model_path=str(path), layer_start=0, layer_end=3, is_first=True, stage_index=0,
            stage_count=2, next_address="127.0.0.1:1", transport="mlx-ring", ring_hosts=ring_hosts,
        )
        return list(stub.LoadShard(request, timeout=60))


def _cpu_seconds(pids: list[int], window_s: float) -> dict[int, float]:
    processes = [psutil.Process(pid) for pid in pids]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    time.sleep(window_s)
    return {p.pid: sum(p.cpu_times()[:2]) - b for p, b in zip(processes, before)}


def test_ring_gives_the_tokens_of_grpc_and_mlx_lm_and_idles_quietly(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    layout = LAYOUTS["llama"][3]
    prompt_ids = load_tokenizer(path).encode(PROMPT)
    expected = reference_generate(path, prompt_ids, NEW_TOKENS)
    long_prompt = PROMPT * 6  # its prefill message does not fit one ring frame
    with running_cluster(tmp_path / "grpc", path, 3, layout) as cluster:
        over_grpc = list(cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS).token_ids)
        long_over_grpc = list(cluster.generate(long_prompt, raw=True, max_tokens=6).token_ids)
    assert over_grpc == expected
    assert len(load_tokenizer(path).encode(long_prompt)) * 64 * 4 > FRAME_BYTES
    with running_cluster(tmp_path / "ring", path, 3, layout, transport="mlx-ring") as cluster:
        assert "stage-to-stage transport: mlx-ring" in cluster.up_output
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert list(summary.token_ids) == expected
        assert list(cluster.generate(long_prompt, raw=True, max_tokens=6).token_ids) == long_over_grpc
        assert cluster.wait_until_idle()
        for name in "abc":
            assert "joined the mx.distributed ring as rank" in (
                tmp_path / "ring" / ".pomona" / "logs" / f"{name}.log"
            ).read_text()
        # Quiet: no receiver polls its socket on a core (MLX's pending recv would).
        time.sleep(0.5)
        busy = _cpu_seconds(cluster_pids(tmp_path / "ring"), 1.5)  # the coordinator's too
        assert all(seconds < 0.6 for seconds in busy.values()), busy
        # And after the quiet spell, the ring still carries requests.
        assert list(cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS).token_ids) == expected


def test_ring_batches_concurrent_requests_and_experts_elsewhere(tmp_path):
    """Six concurrent requests (greedy and seeded) through a 2-stage ring, with a MoE model's
    experts on a third node (expert dispatch stays on gRPC), give the tokens each gives alone."""
    path = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    experts = [{"node": "c", "layers": [0, 4], "experts": [4, 8]}]
    stages = LAYOUTS["mixtral"][2]
    prompts = [PROMPT, PROMPT[:20], PROMPT * 2, "Hello", PROMPT[5:40], "Once upon a time"]
    seeds = [None, 3, None, 7, None, 11]
    kwargs = [dict(temperature=0.0) if s is None else dict(temperature=0.8, seed=s) for s in seeds]
    greedy_ids = load_tokenizer(path).encode(PROMPT)
    expected = reference_generate(path, greedy_ids, NEW_TOKENS)
    with running_cluster(tmp_path / "c", path, 3, stages, experts, transport="mlx-ring") as cluster:
        alone = [
            list(cluster.generate(p, raw=True, max_tokens=NEW_TOKENS, **k).token_ids)
            for p, k in zip(prompts, kwargs)
        ]
        assert alone[0] == expected
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [
                pool.submit(cluster.generate, p, raw=True, max_tokens=NEW_TOKENS, **k)
                for p, k in zip(prompts, kwargs)
            ]
            together = [list(f.result(timeout=300).token_ids) for f in futures]
        assert together == alone
        assert cluster.wait_until_idle()


def test_a_killed_ring_stage_fails_requests_and_asks_for_a_restart(tmp_path):
    """Recovery stays on in cluster.yaml, but a ring cannot be re-formed: the cluster is degraded
    and says which node is gone, at once, instead of trying."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    with running_cluster(tmp_path / "c", path, 3, LAYOUTS["llama"][3], transport="mlx-ring") as cluster:
        _kill_while_generating(cluster, tmp_path / "c", "b")


def test_a_worker_keeps_its_ring_and_refuses_another_layout(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    with running_cluster(tmp_path / "c", path, 2, LAYOUTS["llama"][2], transport="mlx-ring") as cluster:
        assert cluster.generate(PROMPT, raw=True, max_tokens=4).token_ids
        progress = _reload_on_a_ring(tmp_path / "c", cluster, path, ["127.0.0.1:2", "127.0.0.1:3"])
        assert "MLX keeps a process's ring for its lifetime" in progress[-1].error
        assert "pomona down, then pomona up" in progress[-1].error


def test_ring_hosts_must_match_the_stages(tmp_path):
    """A LoadShard with the wrong number of ring hosts is refused before anything forms."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    with running_cluster(tmp_path / "c", path, 1) as cluster:
        with pytest.raises(grpc.RpcError) as refused:
            _reload_on_a_ring(tmp_path / "c", cluster, path, ["127.0.0.1:2"])
        assert "one ring host per stage: 1 for 2 stages" in refused.value.details()


def test_a_ring_whose_neighbour_never_comes_fails_the_load_naming_them(tmp_path):
    """Rank 0 of a ring whose other rank never starts: the join gives up at its deadline with a
    message naming the rank and its neighbours (in a subprocess: MLX's group is per process)."""
    ports = free_ports(2)
    hosts = [f"127.0.0.1:{port}" for port in ports]
    script = (
        "import sys\n"
        "from worker import ring\n"
        "from pomona.errors import PomonaError\n"
        "ring.RING_FORM_TIMEOUT_S = 2.0\n"
        f"try:\n    ring.join({hosts!r}, 0, print)\n"
        "except PomonaError as error:\n    print(error)\n    sys.exit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 3, done.stderr
    assert "did not form within 2 s: rank 0 at " + hosts[0] in done.stdout
    assert f"neighbours {hosts[1]} and {hosts[1]}" in done.stdout
    assert "pomona down, then pomona up" in done.stdout
