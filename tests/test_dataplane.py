"""The data plane under failure: expert replies matched by dispatch id (late and unknown replies
dropped, never fed to another dispatch), and broken links failing requests fast, naming the node,
with later requests refused clearly instead of hanging."""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import psutil
import pytest
from cluster_helpers import running_cluster
from layouts import PROMPT
from tiny_models import make_tiny_checkpoint, reference_generate

from pomona import auth
from pomona.modelinfo import describe_model
from pomona.proto import coordinator_pb2, worker_pb2, worker_pb2_grpc
from pomona.tokenizer import load_tokenizer
from worker.dispatch import Dispatcher
from worker.experts import ExpertStats
from worker.link import LinkBroken

# The bound: a broken link fails the affected requests within this long.
FAIL_WITHIN_S = 2.0


class ScriptedExperts(worker_pb2_grpc.WorkerServicer):
    """An expert node whose replies come late or carry a wrong id, as the request's layer asks:
    layer 1 answers after 0.5 s, layer 2 first sends a reply with an id nobody sent, layer 3
    never answers. Each reply's shape is [layer], so a test sees which request it answers."""

    def Experts(self, request_iterator, context):
        for request in request_iterator:
            if request.layer == 1:
                time.sleep(0.5)
            if request.layer == 2:
                yield worker_pb2.ExpertReply(dispatch_id=request.dispatch_id + 1000)
            if request.layer == 3:
                time.sleep(30)
                continue
            output = worker_pb2.Tensor(dtype="float32", shape=[request.layer])
            yield worker_pb2.ExpertReply(output=output, dispatch_id=request.dispatch_id)


@pytest.fixture
def expert_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServicer_to_server(ScriptedExperts(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop(grace=0)


@pytest.fixture
def dispatcher(expert_server):
    auth.install(auth.NodeSecrets("unchecked"))  # links need the node's secrets; this server checks none
    dispatcher = Dispatcher(ExpertStats())
    dispatcher.connect({"x": expert_server[1]})
    yield dispatcher
    dispatcher.close()


def test_late_reply_is_dropped_not_given_to_the_next_dispatch(dispatcher):
    late = dispatcher.send("x", worker_pb2.ExpertRequest(layer=1))
    with pytest.raises(TimeoutError, match="'x'"):
        dispatcher.receive("x", late, timeout_s=0.1)
    dispatcher.abandon([late])
    # The late reply arrives first on the stream; the next dispatch must get its own.
    following = dispatcher.send("x", worker_pb2.ExpertRequest(layer=5))
    reply = dispatcher.receive("x", following, timeout_s=10)
    assert reply.dispatch_id == following != late
    assert list(reply.output.shape) == [5]
    assert dispatcher.dropped_replies == 1


def test_reply_with_an_unknown_id_is_dropped(dispatcher):
    sent = dispatcher.send("x", worker_pb2.ExpertRequest(layer=2))
    reply = dispatcher.receive("x", sent, timeout_s=10)
    assert reply.dispatch_id == sent
    assert list(reply.output.shape) == [2]
    assert dispatcher.dropped_replies == 1


def test_dead_expert_node_fails_a_waiting_dispatch_fast(expert_server, dispatcher):
    server, _ = expert_server
    waiting = dispatcher.send("x", worker_pb2.ExpertRequest(layer=3))  # never answered
    threading.Timer(0.3, lambda: server.stop(grace=0)).start()
    started = time.monotonic()
    with pytest.raises(LinkBroken, match="node 'x' at 127.0.0.1:"):
        dispatcher.receive("x", waiting, timeout_s=30)
    assert time.monotonic() - started < 0.3 + FAIL_WITHIN_S
    # Later dispatches are refused (or their reopened stream fails) fast, naming the node.
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(LinkBroken, match="'x'"):
            dispatcher.receive("x", dispatcher.send("x", worker_pb2.ExpertRequest(layer=5)), 30)
        assert time.monotonic() - started < FAIL_WITHIN_S
        time.sleep(0.6)


def _worker_pid(directory, node: str) -> int:
    state = json.loads((directory / ".pomona" / "cluster.json").read_text())
    return state["local_workers"][node]["pid"]


def _kill_while_generating(cluster, directory, victim: str) -> None:
    """Kill ``victim``'s worker mid-generation: the request fails within FAIL_WITHIN_S naming
    it, and a later request is refused at once, naming it too."""
    request = coordinator_pb2.GenerateRequest(
        prompt=PROMPT, raw=True, max_tokens=1500, ignore_eos=True,
        sampling=worker_pb2.SamplingParams(),
    )
    stream = cluster.stub.Generate(request, timeout=120)
    next(stream)  # the first token: generation is under way
    psutil.Process(_worker_pid(directory, victim)).kill()
    killed_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        for _ in stream:
            pass
    assert time.monotonic() - killed_at < FAIL_WITHIN_S
    assert f"'{victim}'" in failed.value.details()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        cluster.generate(PROMPT, raw=True, max_tokens=4)
    assert time.monotonic() - started < FAIL_WITHIN_S
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"'{victim}'" in refused.value.details()
    assert "unreachable" in refused.value.details()
    status = cluster.status()  # `pomona status` shows which node is gone
    assert status.state == "degraded" and f"'{victim}'" in status.error
    assert {s.node: s.state for s in status.stages}[victim] == "unreachable"


def test_killed_stage_fails_requests_and_refuses_later_ones(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    with running_cluster(tmp_path / "c", path, 3, [(0, 2), (2, 4), (4, 6)], recovery=False) as cluster:
        _kill_while_generating(cluster, tmp_path / "c", "b")


def test_killed_expert_node_fails_requests_and_refuses_later_ones(tmp_path):
    path = make_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    experts = [
        {"node": "b", "layers": [0, 4], "experts": [0, 4]},
        {"node": "c", "layers": [0, 4], "experts": [4, 8]},
    ]
    with running_cluster(tmp_path / "c", path, 3, [(0, 4)], experts, recovery=False) as cluster:
        _kill_while_generating(cluster, tmp_path / "c", "c")


def test_killed_replica_holder_fails_over_and_the_output_is_unchanged(tmp_path, family_checkpoints):
    """b holds replicas of experts 0-3, c holds every expert: kill b mid-generation and the
    stage's dispatch goes to c at once; the tokens equal single-process mlx-lm's."""
    path = family_checkpoints["mixtral"]
    info = describe_model(path)
    every = [0, info.num_layers]
    experts = [
        {"node": "b", "layers": every, "experts": [0, info.num_experts // 2]},
        {"node": "c", "layers": every, "experts": [0, info.num_experts]},
    ]
    new_tokens = 40
    expected = reference_generate(path, load_tokenizer(path).encode(PROMPT), new_tokens)
    request = coordinator_pb2.GenerateRequest(
        prompt=PROMPT, raw=True, max_tokens=new_tokens, ignore_eos=True,
        sampling=worker_pb2.SamplingParams(),
    )
    with running_cluster(tmp_path / "c", path, 3, [every], experts) as cluster:
        stream = cluster.stub.Generate(request, timeout=120)
        next(stream)  # generation is under way, with b serving its share
        psutil.Process(_worker_pid(tmp_path / "c", "b")).kill()
        chunks = list(stream)
        assert list(chunks[-1].summary.token_ids) == expected
        status = cluster.status()
        assert status.state == "ready"
        assert list(cluster.generate(PROMPT, raw=True, max_tokens=8).token_ids) == expected[:8]
        log = (tmp_path / "c" / ".pomona" / "logs" / "a.log").read_text()
        assert "'b' is down; its experts go to their replicas" in log  # it did fail over
