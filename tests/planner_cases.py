"""Random small clusters for the planner's tests, and an exhaustive search to check it against."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from pomona.costmodel import predict
from pomona.errors import PlacementError
from pomona.modelinfo import ModelInfo
from pomona.placement import LayerRange, Placement, StagePlacement, check_fit
from pomona.profiles import ClusterProfile, ComputeProfile, LinkProfile, NodeProfile, PowerProfile, Workload


def dense_model(num_layers: int, layer_bytes: int = 100, hidden: int = 64) -> ModelInfo:
    return ModelInfo(
        Path("synthetic"),
        "mlx",
        "llama",
        num_layers,
        4096,
        (layer_bytes,) * num_layers,
        layer_bytes // 2,
        layer_bytes // 2,
        False,
        hidden_size=hidden,
    )


def moe_model(
    num_layers: int = 4, experts: int = 8, expert_bytes: int = 100, attention_bytes: int = 50,
    path: str = "synthetic-moe",
) -> ModelInfo:
    """Every layer MoE: `attention_bytes` plus `experts` x `expert_bytes`; top-2 routing."""
    layer = attention_bytes + experts * expert_bytes
    return ModelInfo(
        Path(path), "mlx", "mixtral", num_layers, 4096, (layer,) * num_layers, 40, 40,
        False, num_experts=experts, moe_layers=tuple(range(num_layers)),
        expert_bytes=(expert_bytes,) * num_layers, hidden_size=64, experts_per_token=2,
    )


def moe_node(
    name: str, memory: int, layer_s: float = 0.01, expert_s: float = 0.002, num_layers: int = 4
) -> NodeProfile:
    decode = (layer_s,) * num_layers
    compute = ComputeProfile(
        decode, decode, 64, 1024, decode, 256, 1e-4, 2e-4, expert_s=(expert_s,) * num_layers,
        experts_per_token=2,
    )
    return NodeProfile(name, memory, compute, PowerProfile(5, 50, "estimated (test)"))


def compute(num_layers: int, layer_s: float, embed_s: float = 1e-4, head_s: float = 2e-4) -> ComputeProfile:
    decode = (layer_s,) * num_layers
    return ComputeProfile(
        decode, decode, 64, 1024, tuple(x * 30 for x in decode), 256, embed_s, head_s, source="test"
    )


def node(
    name: str, num_layers: int, layer_s: float, memory: int, idle_w: float, busy_w: float
) -> NodeProfile:
    return NodeProfile(
        name, memory, compute(num_layers, layer_s), PowerProfile(idle_w, busy_w, "estimated (test)")
    )


def mesh(names, latency_s, bandwidth=1e9) -> dict:
    """All ordered pairs; latency_s is a number or a function (a, b) -> seconds."""
    links = {}
    for a, b in itertools.permutations(names, 2):
        lat = latency_s(a, b) if callable(latency_s) else latency_s
        links[(a, b)] = LinkProfile(a, b, lat, lat, bandwidth)
    return links


def random_instance(rng: random.Random) -> tuple[ModelInfo, ClusterProfile]:
    count, layers = rng.randint(2, 4), rng.randint(3, 7)
    model = dense_model(layers, layer_bytes=100)
    nodes = []
    for index in range(count):
        name = f"n{index}"
        memory = rng.choice([250, 400, 700, 1000])
        idle = rng.uniform(2, 30)
        nodes.append(node(name, layers, rng.uniform(0.002, 0.02), memory, idle, idle + rng.uniform(10, 200)))
    latency = {pair: rng.uniform(1e-5, 5e-3) for pair in itertools.permutations([n.name for n in nodes], 2)}
    links = mesh([n.name for n in nodes], lambda a, b: latency[(a, b)], bandwidth=rng.choice([1e7, 1e9]))
    return model, ClusterProfile(tuple(nodes), links)


def compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        edges = (0, *cuts, total)
        yield [edges[i + 1] - edges[i] for i in range(parts)]


def all_placements(model: ModelInfo, cluster: ClusterProfile):
    """Every feasible placement: every ordered subset of nodes, every contiguous split."""
    names = list(cluster.names)
    capacities = {n.name: n.memory_bytes for n in cluster.nodes}
    for k in range(1, min(len(names), model.num_layers) + 1):
        for seq in itertools.permutations(names, k):
            for sizes in compositions(model.num_layers, k):
                stages, start = [], 0
                for i, (name, size) in enumerate(zip(seq, sizes)):
                    stages.append(StagePlacement(name, LayerRange(start, start + size), i == 0, i == k - 1))
                    start += size
                placement = Placement(tuple(stages))
                try:
                    check_fit(model, placement, capacities)
                except PlacementError:
                    continue
                yield placement


def brute_force(model, cluster, workload: Workload, key):
    best = None
    for placement in all_placements(model, cluster):
        prediction = predict(model, placement, cluster, workload)
        value = key(prediction)
        if best is None or value < best[0]:
            best = (value, placement, prediction)
    return best
