"""Expert load: counted on the workers, kept across runs, and used by the planner (load-aware spill,
replicas of the most used experts)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from cluster_helpers import pomona, running_cluster
from layouts import PROMPT
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import load_model
from planner_cases import mesh, moe_model, moe_node
from tiny_models import reference_generate

from pomona.costmodel import expert_shares, predict
from pomona.expert_load import ExpertLoad, add_counts, history_path, load_history, read_counts
from pomona.expert_replicas import replicate_hot_experts
from pomona.experts import plan_experts_for_stages
from pomona.modelinfo import describe_model
from pomona.placement import LayerRange, Placement, StagePlacement
from pomona.profiles import ClusterProfile, Workload
from pomona.tokenizer import load_tokenizer
from worker.expert_counts import count_routed_experts
from worker.experts import ExpertStats
from worker.stage import load_stage

# -- the figures -----------------------------------------------------------------------------------


def test_shares_are_smoothed_measured_fractions():
    load = ExpertLoad.from_counts({3: {0: 6, 2: 2}}, 4, "test")
    assert load.tokens == 8
    shares = [load.share(3, e, 4) for e in range(4)]
    assert shares == pytest.approx([7 / 12, 1 / 12, 3 / 12, 1 / 12])
    assert sum(shares) == pytest.approx(1.0)
    assert load.share(5, 1, 4) == 0.25  # a layer never seen: uniform


def test_history_adds_up_across_runs_one_file_per_model(tmp_path):
    model, other = moe_model(2, path="one"), moe_model(2, path="two")
    assert load_history(tmp_path, model) is None
    add_counts(tmp_path, model, {0: {1: 5}, 1: {2: 3}})
    add_counts(tmp_path, model, {0: {1: 2, 7: 1}})
    assert read_counts(tmp_path, model) == {0: {1: 7, 7: 1}, 1: {2: 3}}
    assert read_counts(tmp_path, other) == {}
    load = load_history(tmp_path, model)
    assert load.tokens == 11 and str(history_path(tmp_path, model)) in load.source
    assert load.source.startswith("measured (")
    history_path(tmp_path, model).write_text("{not json")
    assert load_history(tmp_path, model) is None  # unreadable: ignored (and logged), not fatal


# -- the planner -----------------------------------------------------------------------------------


# s runs both layers but has room for two of their 16 experts; r (slow experts) has room for the
# rest; q (fast experts) has room for one more expert.
MODEL = moe_model(2, path="ckpt")
CLUSTER = ClusterProfile(
    (
        moe_node("s", 40 + 40 + 2 * 50 + 2 * 100, expert_s=0.002, num_layers=2),
        moe_node("r", 2000, expert_s=0.02, num_layers=2),
        moe_node("q", 100, expert_s=0.001, num_layers=2),
    ),
    mesh(["s", "r", "q"], 1e-4),
)
STAGES = (StagePlacement("s", LayerRange(0, 2), True, True),)
CAPACITIES = {node.name: node.memory_bytes for node in CLUSTER.nodes}
HOT = ExpertLoad.from_counts({layer: {3: 500, 5: 300} for layer in (0, 1)}, 8, "test")


def _spread(load):
    experts = plan_experts_for_stages(MODEL, STAGES, CAPACITIES, lambda a, b: 1e-4, load)
    return Placement(STAGES, experts)


def test_the_most_used_expert_stays_on_its_stage_node():
    # Experts leave from the last layer back; within a layer, uniform: highest ids first.
    assert _spread(None).experts.experts_on("s", 0) == (0, 1)
    placement = _spread(HOT)
    assert placement.experts.experts_on("s", 0) == (3, 5)  # measured: the least used leave first
    assert placement.experts.experts_on("s", 1) == ()


def test_measured_load_weighs_each_holders_work():
    placement = _spread(HOT)
    shares = expert_shares(MODEL, placement, 0, "s", Workload(expert_load=HOT))
    local = HOT.share(0, 3, 8) + HOT.share(0, 5, 8)
    assert shares["s"] == pytest.approx(local) and local > 0.99
    assert shares["r"] == pytest.approx(1 - local)
    uniform = expert_shares(MODEL, placement, 0, "s", Workload())
    assert uniform["s"] == pytest.approx(2 / 8)


def test_a_replica_of_the_hottest_remote_expert_goes_where_it_pays():
    workload = Workload(expert_load=HOT)
    placement = _spread(HOT)
    before = predict(MODEL, placement, CLUSTER, workload)
    replicated, added = replicate_hot_experts(MODEL, placement, CLUSTER, workload, "latency", CAPACITIES)
    assert added == 1  # q has room for one copy
    holders = replicated.experts.holders
    copies = [(layer, e) for layer in (0, 1) for e in range(8) if len(holders(layer, e)) > 1]
    assert copies == [(1, 3)]  # the most used expert that had to leave s
    assert set(replicated.experts.holders(*copies[0])) == {"r", "q"}
    after = predict(MODEL, replicated, CLUSTER, workload)
    assert after.decode_s_per_token < before.decode_s_per_token
    # Uniform routing (no statistics): nothing is hot, nothing is copied.
    assert replicate_hot_experts(MODEL, _spread(None), CLUSTER, Workload(), "latency", CAPACITIES)[1] == 0


# -- the workers count -----------------------------------------------------------------------------


class _Recording(SwitchGLU):
    """The test's own view of the router's choices (the oracle for the counters)."""

    seen: list[np.ndarray]

    def __call__(self, x, indices):
        type(self).seen.append(np.array(indices).reshape(-1))
        return super().__call__(x, indices)


def test_a_stage_counts_its_own_experts_without_changing_its_output(family_checkpoints):
    path = family_checkpoints["mixtral"]
    info = describe_model(path)
    tokens = mx.array([[5, 17, 42, 99, 7, 3]])
    plain = load_stage(path, 0, info.num_layers, True, True)
    counted = load_stage(path, 0, info.num_layers, True, True)
    stats = ExpertStats()
    assert count_routed_experts(counted.layers, counted.layer_indices, stats) == len(info.moe_layers)
    expected = plain.logits(plain.forward(tokens, plain.new_caches()))
    got = counted.logits(counted.forward(tokens, counted.new_caches()))
    np.testing.assert_array_equal(np.array(got), np.array(expected))

    full, _ = load_model(path)
    for layer in full.model.layers:
        layer.block_sparse_moe.switch_mlp.__class__ = _Recording
    _Recording.seen = []
    mx.eval(full(tokens))
    reply = stats.to_proto()
    assert [entry.layer for entry in reply.layers] == list(info.moe_layers)
    for entry, seen in zip(reply.layers, _Recording.seen):
        ids, counts = np.unique(seen, return_counts=True)
        assert list(entry.expert_ids) == ids.tolist() and list(entry.tokens) == counts.tolist()


def test_up_down_keeps_the_expert_load_and_plan_uses_it(family_checkpoints, tmp_path):
    path = family_checkpoints["mixtral"]
    info = describe_model(path)
    middle, half = info.num_layers // 2, info.num_experts // 2
    stages = [[0, middle], [middle, info.num_layers]]
    # Layers before `middle`: all experts on a (its own counter); after: split between b and c.
    experts = [{"node": "c", "layers": [middle, info.num_layers], "experts": [0, half]}]
    prompt_ids = load_tokenizer(path).encode(PROMPT)
    new_tokens = 6
    with running_cluster(tmp_path, path, 3, stages, experts) as cluster:
        summary = cluster.generate(PROMPT, max_tokens=new_tokens, raw=True)
        assert list(summary.token_ids) == reference_generate(path, prompt_ids, new_tokens)
    counts = read_counts(tmp_path / ".pomona", info)
    # Every token that went through the model (the prompt, and each generated token but the last)
    # picked top-k experts in every MoE layer.
    routed = (summary.prompt_tokens + new_tokens - 1) * info.experts_per_token
    assert sorted(counts) == list(info.moe_layers)
    assert all(sum(per_expert.values()) == routed for per_expert in counts.values()), counts

    result = pomona("plan", "--json", str(tmp_path / "cluster.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    load = json.loads(result.stdout)["workload"]["expert_load"]
    assert load["routed_tokens"] == routed * len(info.moe_layers)
    assert history_path(tmp_path / ".pomona", info).name in load["source"]
    # The next `up` in this directory plans with it too, and says so.
    with running_cluster(tmp_path, path, 3, stages, experts) as cluster:
        assert f"expert load: {routed * len(info.moe_layers)} routed tokens" in cluster.up_output
