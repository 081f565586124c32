"""Heartbeats: a node that hangs (SIGSTOP: its sockets stay open, so no stream breaks) fails the
requests in flight within 3 s with an error naming it; when it resumes, the cluster serves again
with the undisturbed tokens."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from cluster_helpers import cluster_state, running_cluster
from layouts import PROMPT
from tiny_models import make_tiny_checkpoint, reference_generate

from pomona.proto import coordinator_pb2, worker_pb2
from pomona.tokenizer import load_tokenizer

DETECT_WITHIN_S = 3.0
RECOVER_WITHIN_S = 60.0
NEW_TOKENS = 8


def _hang_while_generating(cluster, directory, victim: str) -> None:
    request = coordinator_pb2.GenerateRequest(
        prompt=PROMPT, raw=True, max_tokens=400, ignore_eos=True, sampling=worker_pb2.SamplingParams()
    )
    stream = cluster.stub.Generate(request, timeout=120)
    next(stream)  # generation is under way
    pid = cluster_state(directory)["local_workers"][victim]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            for _ in stream:
                pass
        detected_s = time.monotonic() - stopped_at
        print(f"node {victim!r} hung: its request failed after {detected_s:.2f} s")
        assert detected_s < DETECT_WITHIN_S
        assert f"'{victim}'" in failed.value.details() and "heartbeat" in failed.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            cluster.generate(PROMPT, raw=True, max_tokens=4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"'{victim}'" in refused.value.details()
        status = cluster.status()
        assert status.state == "degraded"
        assert {s.node: s.state for s in status.stages}[victim] == "unreachable"
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + RECOVER_WITHIN_S
    while cluster.status().state != "ready":
        assert time.monotonic() < deadline, "the resumed node was not taken back"
        time.sleep(0.5)


def test_a_hung_stage_fails_requests_within_3_s_and_serves_again(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    expected = reference_generate(path, load_tokenizer(path).encode(PROMPT), NEW_TOKENS)
    with running_cluster(tmp_path / "c", path, 3, [(0, 2), (2, 4), (4, 6)], recovery=False) as cluster:
        _hang_while_generating(cluster, tmp_path / "c", "b")
        assert list(cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS).token_ids) == expected


def test_a_hung_expert_node_fails_requests_within_3_s(tmp_path):
    path = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    expected = reference_generate(path, load_tokenizer(path).encode(PROMPT), NEW_TOKENS)
    experts = [{"node": "b", "layers": [0, 4], "experts": [4, 8]}]
    with running_cluster(tmp_path / "c", path, 2, [(0, 4)], experts, recovery=False) as cluster:
        _hang_while_generating(cluster, tmp_path / "c", "b")
        assert list(cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS).token_ids) == expected
