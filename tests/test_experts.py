"""Expert parallelism against the oracle: MoE experts spread over nodes (expert-only nodes,
uneven splits, replicas, several layers per node) give single-process mlx-lm's greedy tokens."""

from __future__ import annotations

import concurrent.futures

import pytest
from cluster_helpers import running_cluster
from layouts import PROMPT
from tiny_models import make_tiny_checkpoint, reference_generate

from pomona.modelinfo import describe_model
from pomona.tokenizer import load_tokenizer

MOE_FAMILIES = ("mixtral", "qwen3_moe", "llama4", "deepseek_v3")
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: make_tiny_checkpoint(family, root / family) for family in MOE_FAMILIES}


def _layouts(num_layers: int, num_experts: int):
    """name -> (node count, stages, experts entries). Nodes are a, b, c, d in order."""
    every = [0, num_layers]
    half = num_experts // 2
    middle = num_layers // 2
    return {
        # One stage; its experts split over two expert-only nodes (b, c), all layers on each.
        "one-stage-two-expert-nodes": (3, [every], [
            {"node": "b", "layers": every, "experts": [0, half]},
            {"node": "c", "layers": every, "experts": [half, num_experts]},
        ]),
        # Two stages; experts spread unevenly over a, b and the expert-only node c.
        "two-stages-three-nodes-uneven": (3, [[0, middle], [middle, num_layers]], [
            {"node": "c", "layers": every, "experts": [1, num_experts - 1]},
            {"node": "b", "layers": [0, middle], "experts": {"ids": [0]}},
        ]),
        # A replicated expert: expert 0 on both b and c (either may serve it).
        "replica": (3, [every], [
            {"node": "b", "layers": every, "experts": [0, half]},
            {"node": "c", "layers": every, "experts": [0, num_experts]},
        ]),
    }


CASES = [
    (family, layout)
    for family in MOE_FAMILIES
    for layout in ("one-stage-two-expert-nodes", "two-stages-three-nodes-uneven", "replica")
]


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{family}-{name}" for family, name in CASES])
def test_expert_parallel_matches_single_process(checkpoints, tmp_path, family, layout):
    path = checkpoints[family]
    info = describe_model(str(path))
    nodes, stages, experts = _layouts(info.num_layers, info.num_experts)[layout]
    prompt_ids = load_tokenizer(path).encode(PROMPT)
    expected = reference_generate(path, prompt_ids, NEW_TOKENS)
    with running_cluster(tmp_path, path, nodes, stages, experts) as cluster:
        assert "routed experts" in cluster.up_output  # `up` shows where expert groups live
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert list(summary.token_ids) == expected
        stats = cluster.expert_stats()
        remote = [n for n in stats.nodes if n.node != "a" and n.stats.layers]
        assert remote, "no expert node computed anything"
        assert any(link.bytes_sent > 0 for n in stats.nodes for link in n.stats.links)


def test_expert_parallel_concurrent_requests(checkpoints, tmp_path):
    path = checkpoints["mixtral"]
    info = describe_model(str(path))
    nodes, stages, experts = _layouts(info.num_layers, info.num_experts)[
        "two-stages-three-nodes-uneven"
    ]
    prompts = [PROMPT, PROMPT[:25], "Hello there", PROMPT * 2]
    with running_cluster(tmp_path, path, nodes, stages, experts) as cluster:
        alone = [list(cluster.generate(p, raw=True, max_tokens=8).token_ids) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(cluster.generate, p, raw=True, max_tokens=8) for p in prompts]
            together = [list(f.result(timeout=300).token_ids) for f in futures]
        assert together == alone


def test_automatic_spreading_when_experts_do_not_fit(checkpoints, tmp_path):
    """No `experts:` list, but the stage node's memory holds only part of its experts: the
    planner moves whole experts to nodes with room, and the output is still the reference's."""
    path = checkpoints["mixtral"]
    info = describe_model(str(path))
    non_expert = info.total_bytes - sum(info.expert_bytes) * info.num_experts
    room = non_expert + sum(info.expert_bytes) * info.num_experts // 2  # about half the experts
    nodes = [{"name": "a", "memory_gb": room / 2**30}, {"name": "b"}, {"name": "c"}]
    prompt_ids = load_tokenizer(path).encode(PROMPT)
    expected = reference_generate(path, prompt_ids, NEW_TOKENS)
    with running_cluster(tmp_path, path, 3, [[0, info.num_layers]], node_overrides=nodes) as cluster:
        groups = cluster.status().expert_groups
        assert {g.node for g in groups} - {"a"}, "no expert moved off the stage node"
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert list(summary.token_ids) == expected
