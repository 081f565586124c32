"""The cost model: what a placement will cost on a profiled cluster, before anything loads.

`predict(model, placement, cluster, workload)` is a pure function over frozen dataclasses. For one
decode token it adds, in ring order, each stage's compute (its layers at the workload's mean
context, plus the embedding on the first stage and the head on the last) and each one-way hop
(latency plus the hidden state's bytes over the link's bandwidth; the last stage sends only a
token id back to the first). An MoE layer whose experts are partly elsewhere costs its non-expert
part, then the slowest of: its local experts, and for every other holder one round trip with the
token's hidden state plus that holder's expert compute (the sends go out together).

TTFT: the coordinator's hop to stage 0, the prompt's chunks through the pipeline (the first chunk
through every stage, the others behind the slowest stage: stage 0 starts chunk 2 while stage 1
runs chunk 1), the head once, and the token's hop to the coordinator.

Steady throughput with k streams: each stage serves one request's step at a time, so the ring
delivers min(k / step latency, 1 / busiest stage's time per token) tokens per second.

Energy per token: every serving node (stage or expert holder) draws its idle power for the whole
time a token takes (1 / throughput), plus its extra busy power while it computes its share.
Routing is uniform over experts (each expert receives top_k / num_experts of the tokens) unless the
workload carries the cluster's measured expert load (`pomona.expert_load`); then each expert gets
its measured share. A replicated expert's work is split evenly between its holders (they take
turns), except that a stage node holding a copy itself always computes it locally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pomona.modelinfo import ModelInfo
from pomona.placement import Placement
from pomona.profiles import COORDINATOR, ClusterProfile, Workload

TOKEN_ID_BYTES = 4
WIRE_ACTIVATION_BYTES = 4  # hidden states travel as float32 today


@dataclass(frozen=True)
class StageCost:
    node: str
    decode_compute_s: float  # per token, this stage's own layers (incl. waiting on dispatch)
    prefill_chunk_s: float  # one full prefill chunk through this stage
    dispatch_s: float  # part of decode_compute_s spent waiting for remote experts
    hop_s: float  # one-way hop to the next stage (per decode token)
    next_node: str


@dataclass(frozen=True)
class NodeEnergy:
    node: str
    busy_s: float  # compute per token on this node (stage layers and experts it serves)
    idle_w: float
    busy_w: float
    power_basis: str


@dataclass(frozen=True)
class Prediction:
    decode_s_per_token: float  # one stream, one token around the ring
    ttft_s: float
    throughput_tok_s: float  # aggregate at the workload's concurrency
    j_per_token: float
    prefill_j: float  # energy of the prompt's prefill (every serving node, for the TTFT)
    energy_basis: str  # "measured (...)" when every node's power was measured, else estimated
    bottleneck: str  # node whose stage limits throughput
    stages: tuple[StageCost, ...]
    nodes: tuple[NodeEnergy, ...]

    @property
    def decode_tok_s(self) -> float:
        return 1.0 / self.decode_s_per_token if self.decode_s_per_token > 0 else math.inf


def hidden_bytes_per_token(model: ModelInfo) -> int:
    return max(model.hidden_size, 1) * WIRE_ACTIVATION_BYTES


def expert_shares(
    model: ModelInfo, placement: Placement, layer: int, node: str, workload: Workload
) -> dict[str, float]:
    """Holder -> the share of `layer`'s routed work it computes when stage `node` runs the layer:
    the measured (or uniform) share of each expert it holds, split between replicas, which take
    turns; a copy on the stage node itself always serves locally (the dispatcher prefers it)."""
    experts = placement.experts.get(layer) if placement.experts else None
    holders: dict[str, float] = {}
    load = workload.expert_load
    for expert, nodes in (experts or {}).items():
        share = load.share(layer, expert, model.num_experts) if load else 1.0 / model.num_experts
        if node in nodes:
            holders[node] = holders.get(node, 0.0) + share
            continue
        for holder in nodes:
            holders[holder] = holders.get(holder, 0.0) + share / len(nodes)
    return holders


def _moe_layer_s(
    model: ModelInfo,
    placement: Placement,
    cluster: ClusterProfile,
    layer: int,
    node: str,
    workload: Workload,
    busy: dict[str, float],
) -> tuple[float, float]:
    """(decode seconds of `layer` on stage `node`, of which waiting on remote experts)."""
    compute = cluster.node(node).compute
    whole = compute.decode_at(layer, workload.mean_decode_context)
    holders = expert_shares(model, placement, layer, node, workload)
    if not holders or set(holders) == {node}:
        busy[node] += whole
        return whole, 0.0
    top_k = compute.experts_per_token or 1
    non_expert = max(whole - top_k * compute.expert_s[layer], 0.0)
    local = top_k * holders.get(node, 0.0) * compute.expert_s[layer]
    busy[node] += non_expert + local
    slowest_remote = 0.0
    size = hidden_bytes_per_token(model)
    for holder, share in holders.items():
        if holder == node:
            continue
        remote = cluster.node(holder).compute
        work = top_k * share * remote.expert_s[layer]
        busy[holder] += work
        there = cluster.link(node, holder).transfer_s(size)
        back = cluster.link(holder, node).transfer_s(size * max(1.0, top_k * share))
        slowest_remote = max(slowest_remote, there + work + back)
    wait = max(local, slowest_remote)
    return non_expert + wait, max(wait - local, 0.0)


def predict(
    model: ModelInfo, placement: Placement, cluster: ClusterProfile, workload: Workload
) -> Prediction:
    """Decode latency, TTFT, throughput and energy of `placement`; see the module docstring."""
    context = workload.mean_decode_context
    stages = placement.stages
    busy = {name: 0.0 for name in placement.nodes}
    costs: list[StageCost] = []
    size = hidden_bytes_per_token(model)
    for index, stage in enumerate(stages):
        compute = cluster.node(stage.node).compute
        total = dispatch = 0.0
        for layer in stage.layers:
            if model.expert_bytes[layer]:
                seconds, waiting = _moe_layer_s(model, placement, cluster, layer, stage.node, workload, busy)
                total += seconds
                dispatch += waiting
            else:
                seconds = compute.decode_at(layer, context)
                busy[stage.node] += seconds
                total += seconds
        extra = (compute.embed_s if stage.is_first else 0.0) + (compute.head_s if stage.is_last else 0.0)
        total += extra
        busy[stage.node] += extra
        chunk = sum(compute.prefill_layer_s[layer] for layer in stage.layers)
        chunk += compute.embed_s * compute.prefill_chunk_tokens if stage.is_first else 0.0
        next_stage = stages[(index + 1) % len(stages)]
        if len(stages) == 1:
            hop = 0.0
        elif stage.is_last:
            hop = cluster.link(stage.node, next_stage.node).transfer_s(TOKEN_ID_BYTES)
        else:
            hop = cluster.link(stage.node, next_stage.node).transfer_s(size)
        costs.append(StageCost(stage.node, total, chunk, dispatch, hop, next_stage.node))

    step_s = sum(c.decode_compute_s + c.hop_s for c in costs)
    # A stage's engine is busy for its compute; its output then travels on gRPC's own thread.
    per_stage = [c.decode_compute_s for c in costs]
    bottleneck_index = max(range(len(costs)), key=lambda i: per_stage[i])
    throughput = min(workload.concurrency / step_s, 1.0 / per_stage[bottleneck_index])

    ttft = _ttft(model, placement, cluster, workload, costs)
    energy, nodes = _energy(cluster, busy, throughput)
    prefill_j = _prefill_energy(cluster, placement, costs, workload, ttft)
    all_measured = all(cluster.node(n.node).power.measured for n in nodes)
    basis = (
        nodes[0].power_basis
        if len({n.power_basis for n in nodes}) == 1
        else ("measured (several meters)" if all_measured else "estimated (mixed: see each node)")
    )
    return Prediction(
        decode_s_per_token=step_s,
        ttft_s=ttft,
        throughput_tok_s=throughput,
        j_per_token=energy,
        prefill_j=prefill_j,
        energy_basis=basis,
        bottleneck=costs[bottleneck_index].node,
        stages=tuple(costs),
        nodes=nodes,
    )


def _ttft(
    model: ModelInfo,
    placement: Placement,
    cluster: ClusterProfile,
    workload: Workload,
    costs: list[StageCost],
) -> float:
    first, last = placement.stages[0].node, placement.stages[-1].node
    chunk_tokens = cluster.node(first).compute.prefill_chunk_tokens
    chunks = max(1, math.ceil(workload.prompt_tokens / chunk_tokens))
    scale = workload.prompt_tokens / (chunks * chunk_tokens)  # chunks are evenly filled on average
    size = hidden_bytes_per_token(model) * chunk_tokens * scale
    per_stage = []
    for index, cost in enumerate(costs):
        hop = 0.0
        if index + 1 < len(costs):
            hop = cluster.link(cost.node, cost.next_node).transfer_s(size)
        per_stage.append((cost.prefill_chunk_s * scale, hop))
    through = sum(s + h for s, h in per_stage)
    slowest = max(s for s, _ in per_stage)
    head = cluster.node(last).compute.head_s
    to_first = _coordinator_link(cluster, first, TOKEN_ID_BYTES * workload.prompt_tokens)
    back = _coordinator_link(cluster, last, TOKEN_ID_BYTES)
    return to_first + through + (chunks - 1) * slowest + head + back


def _prefill_energy(
    cluster: ClusterProfile,
    placement: Placement,
    costs: list[StageCost],
    workload: Workload,
    ttft_s: float,
) -> float:
    """Idle power of every serving node for the TTFT, plus each stage's extra busy power while it
    runs the prompt's chunks."""
    chunk_tokens = cluster.node(placement.stages[0].node).compute.prefill_chunk_tokens
    chunks = workload.prompt_tokens / chunk_tokens
    total = sum(cluster.node(name).power.idle_w for name in placement.nodes) * ttft_s
    for cost in costs:
        power = cluster.node(cost.node).power
        total += (power.busy_w - power.idle_w) * cost.prefill_chunk_s * chunks
    return total


def _coordinator_link(cluster: ClusterProfile, node: str, num_bytes: float) -> float:
    link = cluster.links.get((COORDINATOR, node))
    return link.transfer_s(num_bytes) if link is not None else 0.0


def _energy(
    cluster: ClusterProfile, busy: dict[str, float], throughput: float
) -> tuple[float, tuple[NodeEnergy, ...]]:
    seconds_per_token = 1.0 / throughput
    nodes, total = [], 0.0
    for name, busy_s in busy.items():
        power = cluster.node(name).power
        total += power.idle_w * seconds_per_token + (power.busy_w - power.idle_w) * busy_s
        nodes.append(NodeEnergy(name, busy_s, power.idle_w, power.busy_w, power.basis))
    return total, tuple(nodes)
