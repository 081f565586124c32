"""Replicas of the most used experts, where the cost model says they pay (EPLB-style, link-aware).

DeepSeek's EPLB replicates the expert with the highest load per replica, then packs replicas onto
devices. Pomona's nodes differ in speed, power and links, so the packing is the cost model's call:
starting from a placement whose experts are spread off full stage nodes, each round takes the MoE
layers' most loaded remote experts (measured share per replica) as candidates, tries a copy of
each on every node with free memory (the stage node itself included: a local copy ends the round
trip for it), and keeps the copy that most improves the objective's figure, until no copy helps
or `MAX_ROUNDS` is reached. Only with measured expert load: under uniform routing no expert is hot.
Pure: profiles in, a placement out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pomona.costmodel import Prediction, predict
from pomona.experts import ExpertMap
from pomona.modelinfo import ModelInfo
from pomona.placement import Placement
from pomona.profiles import ClusterProfile, Workload
from pomona.weight_bytes import held_bytes

MAX_ROUNDS = 64
CANDIDATES_PER_ROUND = 4
MIN_GAIN = 0.005  # a copy must improve the objective's figure by 0.5%


def objective_figure(objective: str) -> Callable[[Prediction], float]:
    """The figure `objective` minimises (balanced: energy; the caller bounds latency)."""
    if objective == "latency":
        return lambda p: p.decode_s_per_token
    if objective == "throughput":
        return lambda p: -p.throughput_tok_s
    return lambda p: p.j_per_token


def _free_bytes(
    model: ModelInfo, placement: Placement, capacities: Mapping[str, int], kv_tokens: int
) -> dict[str, int]:
    holders = {layer: dict(experts) for layer, experts in placement.experts.items()}
    used = held_bytes(model, placement.stages, holders)
    for stage in placement.stages:
        used[stage.node] = used.get(stage.node, 0) + model.kv_bytes_per_token * kv_tokens * len(stage.layers)
    return {node: capacity - used.get(node, 0) for node, capacity in capacities.items()}


def _candidates(model: ModelInfo, placement: Placement, workload: Workload) -> list[tuple[int, int]]:
    """(layer, expert): per MoE layer its remote expert with the most load per replica, hottest first."""
    stage_of = {layer: stage.node for stage in placement.stages for layer in stage.layers}
    load = workload.expert_load
    ranked = []
    for layer, experts in placement.experts.items():
        remote = [
            (load.share(layer, e, model.num_experts) / len(nodes), e)
            for e, nodes in experts.items()
            if stage_of.get(layer) not in nodes
        ]
        if remote:
            share, expert = max(remote)
            ranked.append((share, layer, expert))
    ranked.sort(reverse=True)
    return [(layer, expert) for _, layer, expert in ranked[:CANDIDATES_PER_ROUND]]


def _with_copy(placement: Placement, layer: int, expert: int, node: str) -> Placement:
    layers = {lay: dict(experts) for lay, experts in placement.experts.items()}
    layers[layer][expert] = (*layers[layer][expert], node)
    return Placement(placement.stages, ExpertMap(layers))


def replicate_hot_experts(
    model: ModelInfo,
    placement: Placement,
    cluster: ClusterProfile,
    workload: Workload,
    objective: str,
    capacities: Mapping[str, int],
    kv_tokens: int = 0,
) -> tuple[Placement, int]:
    """`placement` with replicas added as the module docstring says, and how many were added.

    A copy is kept only if it lowers the objective's figure by `MIN_GAIN` without making decode
    latency worse (so `balanced` keeps its latency bound).
    """
    if workload.expert_load is None or not placement.experts:
        return placement, 0
    figure = objective_figure(objective)
    current = predict(model, placement, cluster, workload)
    added = 0
    for _ in range(MAX_ROUNDS):
        free = _free_bytes(model, placement, capacities, kv_tokens)
        best = None
        for layer, expert in _candidates(model, placement, workload):
            size = model.expert_bytes[layer]
            holders = placement.experts.holders(layer, expert)
            for node in cluster.names:
                if node in holders or free.get(node, 0) < size:
                    continue
                trial = _with_copy(placement, layer, expert, node)
                predicted = predict(model, trial, cluster, workload)
                if predicted.decode_s_per_token > current.decode_s_per_token * (1 + 1e-9):
                    continue
                if best is None or figure(predicted) < figure(best[1]):
                    best = (trial, predicted)
        if best is None or figure(best[1]) > figure(current) - MIN_GAIN * abs(figure(current)):
            break
        placement, current = best
        added += 1
    return placement, added
