"""The planner: which nodes serve, in which ring order, with which contiguous layer ranges and where
the experts go, chosen by the cost model (`pomona.costmodel`) for an objective. Pure: profiles in,
a `Plan` out.

Objectives (`placement.objective`, `--objective`):
- `latency`: least decode seconds per token for one stream.
- `throughput`: most aggregate tokens per second at the workload's concurrency.
- `energy`: least joules per token.
- `balanced` (default): least joules per token among plans whose latency is within
  (1 + slack) x the best latency.

How (documented, since exactness depends on it; the search itself is `pomona.split_search`):
- A *sequence* is an ordered choice of nodes (the ring order; nodes not in it are left out). For a
  sequence, the best contiguous split is an exact dynamic program over split points, vectorised
  with numpy: stage m ending at layer j costs min over i of (stage m-1 ending at i) + hop + the
  node's compute for layers [i, j); splits that do not fit a node's memory (weights + KV budget)
  are excluded. Latency is additive per sequence; so is energy for one stream once the sequence
  fixes the serving set S (J/token = sum over stages of (idle power of S + node's extra busy
  power) x compute + idle power of S x hops).
- Up to 6 nodes every ordered subset is a candidate sequence; beyond, the fastest m nodes for
  several m (grown by memory until they hold the model), each ring built greedily along the
  cheapest links from every start.
- Small instances (sequences x stages x layers^2 <= `SMALL_WORK`): every Pareto-optimal split in
  (latency, busiest stage, busy energy) of every sequence is kept; every objective is
  non-decreasing in all three, so each optimum is exact (tested against brute force).
- Larger ones: `latency` and one-stream `energy` stay exact (additive DPs); `balanced` bisects a
  Lagrange multiplier per sequence for the least energy + lambda x latency within the latency
  bound, then shifts stage boundaries one layer at a time while energy drops within the bound;
  `throughput` bounds the busiest stage by a grid of thresholds. Both are near-optimal, not proven.
- MoE models place whole layers with their experts first; when no sequence fits, stages hold
  layers without (some of) their routed experts, which go to the nodes with the cheapest links to
  the stage that have free memory (`pomona.experts.plan_experts_for_stages`). With the cluster's
  measured expert load (`pomona.expert_load`) the least used experts move first and the most
  used get replicas where the cost model says they pay (`pomona.expert_replicas`).

Baselines scored by the same cost model: `even` (every node, equal layer counts: mlx-lm),
`memory` (every node, layers in proportion to memory: exo), `compute` (the planner with every link
free: compute only, as prima.cpp).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pomona.config import OBJECTIVES
from pomona.costmodel import Prediction, predict
from pomona.errors import PlacementError
from pomona.expert_replicas import replicate_hot_experts
from pomona.experts import plan_experts_for_stages
from pomona.modelinfo import ModelInfo
from pomona.placement import Placement, StagePlacement, assign_layers, check_fit
from pomona.profiles import ClusterProfile, Workload
from pomona.split_search import (
    SMALL_WORK,
    ExactSearch,
    Search,
    Tables,
    build_tables,
    stage_placements,
    stages_of,
)
from pomona.weight_bytes import format_bytes


@dataclass(frozen=True)
class PlanOption:
    """A placement and what the cost model predicts for it; `placement` None when infeasible."""

    name: str
    placement: Placement | None
    prediction: Prediction | None
    note: str = ""  # why infeasible, or how it was made


@dataclass(frozen=True)
class Plan:
    chosen: PlanOption
    objective: str
    workload: Workload
    left_out: dict[str, str] = field(default_factory=dict)  # node -> why it does not serve
    baselines: tuple[PlanOption, ...] = ()


# -- the public entry points ---------------------------------------------------------------------


def _option(
    name: str,
    model: ModelInfo,
    cluster: ClusterProfile,
    workload: Workload,
    stages: tuple[StagePlacement, ...],
    note: str = "",
    objective: str | None = None,
    kv_tokens: int = 0,
) -> PlanOption:
    """Score stages with the full cost model, experts spread by cheapest link if they must be.

    With `objective` (the planner's own choice, not a baseline) and measured expert load, the
    least used experts leave a full stage node first and the most used get replicas where they
    pay (`pomona.expert_replicas`)."""
    capacities = {node.name: node.memory_bytes for node in cluster.nodes}
    load = workload.expert_load if objective is not None else None

    def link_cost(a: str, b: str) -> float:
        return cluster.link(a, b).latency_s

    try:
        experts = plan_experts_for_stages(model, stages, capacities, link_cost, load)
        placement = Placement(stages, experts)
        check_fit(model, placement, capacities)
    except PlacementError as error:
        return PlanOption(name, None, None, f"does not fit: {error}")
    if load is not None:
        placement, added = replicate_hot_experts(
            model, placement, cluster, workload, objective, capacities, kv_tokens
        )
        if added:
            note = "; ".join(filter(None, [note, f"{added} replicas of the most used experts"]))
    return PlanOption(name, placement, predict(model, placement, cluster, workload), note)


def _search_best(search: Search, objective: str, slack: float, workload: Workload):
    t = search.t
    work = sum(len(seq) for seq in search.sequences) * t.num_layers**2
    if work <= SMALL_WORK:
        return ExactSearch(search, workload.concurrency).best(objective, slack, workload.concurrency)
    if objective == "latency":
        return search.latency()
    if objective == "energy":
        return search.energy() if workload.concurrency <= 1 else search.balanced(1e9)
    if objective == "balanced":
        return search.balanced(slack)
    return search.throughput(workload.concurrency)


def plan(
    model: ModelInfo,
    cluster: ClusterProfile,
    workload: Workload,
    objective: str = "balanced",
    slack: float = 0.1,
    kv_tokens: int = 0,
) -> Plan:
    """The best placement of `model` on `cluster` for `objective`, with the three baselines.

    kv_tokens: context tokens each node must keep room for per layer (max context x streams).
    Raises PlacementError when no subset of the nodes can hold the model.
    """
    if objective not in OBJECTIVES:
        raise PlacementError(f"unknown placement objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if slack < 0:
        raise PlacementError(f"placement.slack must be >= 0 (got {slack}); 0.1 allows 10% slower")
    names = list(cluster.names)
    if not names:
        raise PlacementError("there are no nodes to place the model on; add nodes to cluster.yaml")
    kv_total = model.kv_bytes_per_token * kv_tokens * model.num_layers
    if sum(node.memory_bytes for node in cluster.nodes) < model.total_bytes + kv_total:
        raise _no_fit(model, cluster, kv_tokens)
    note = ""
    tables = build_tables(model, cluster, names, workload, kv_tokens, without_experts=False)
    search = Search(tables, cluster, model)
    _, seq, ends = _search_best(search, objective, slack, workload)
    if seq is None and model.is_moe:
        # No stage can hold its layers' experts: stages keep attention and routers, experts spill.
        tables = build_tables(model, cluster, names, workload, kv_tokens, without_experts=True)
        search = Search(tables, cluster, model)
        _, seq, ends = _search_best(search, objective, slack, workload)
        note = "experts moved off stage nodes that cannot hold them"
    if seq is None:
        raise _no_fit(model, cluster, kv_tokens)
    chosen = _option(
        objective, model, cluster, workload, stages_of(tables, seq, ends), note, objective, kv_tokens
    )
    if chosen.placement is None:
        raise PlacementError(chosen.note.removeprefix("does not fit: "))
    used = set(chosen.placement.nodes)
    left_out = {
        n: _why_left_out(n, model, cluster, tables, used, objective, kv_tokens)
        for n in names
        if n not in used
    }
    return Plan(chosen, objective, workload, left_out, baselines(model, cluster, workload, kv_tokens))


def baselines(
    model: ModelInfo, cluster: ClusterProfile, workload: Workload, kv_tokens: int = 0
) -> tuple[PlanOption, ...]:
    """even (mlx-lm), memory-proportional (exo), compute-only ignoring the network (prima.cpp)."""
    names = list(cluster.names)
    options = []
    count, layers = len(names), model.num_layers
    if count > layers:
        options.append(PlanOption("even", None, None, f"{count} nodes but only {layers} layers"))
        options.append(PlanOption("memory", None, None, f"{count} nodes but only {layers} layers"))
    else:
        base, extra = divmod(layers, count)
        sizes = [base + (1 if i < extra else 0) for i in range(count)]
        options.append(_option("even", model, cluster, workload, _stages(names, sizes), "equal layer counts"))
        capacities = [cluster.node(n).memory_bytes for n in names]
        ranges = assign_layers(model.layer_bytes, model.embed_bytes, model.head_bytes, capacities)
        options.append(
            _option(
                "memory",
                model,
                cluster,
                workload,
                _stages(names, [len(r) for r in ranges]),
                "layers in proportion to memory",
            )
        )
    free = build_tables(model, cluster, names, workload, kv_tokens, without_experts=False, free_links=True)
    _, seq, ends = Search(free, cluster, model).latency()
    if seq is None:
        options.append(PlanOption("compute", None, None, "no split fits with whole layers"))
    else:
        options.append(
            _option(
                "compute",
                model,
                cluster,
                workload,
                stages_of(free, seq, ends),
                "least compute, links ignored",
            )
        )
    return tuple(options)


def _stages(names: Sequence[str], sizes: Sequence[int]) -> tuple[StagePlacement, ...]:
    return stage_placements(names, list(itertools.accumulate(sizes)))


def _no_fit(model: ModelInfo, cluster: ClusterProfile, kv_tokens: int) -> PlacementError:
    total = sum(node.memory_bytes for node in cluster.nodes)
    kv = model.kv_bytes_per_token * kv_tokens * model.num_layers
    listing = ", ".join(f"{n.name} {format_bytes(n.memory_bytes)}" for n in cluster.nodes)
    return PlacementError(
        f"the model does not fit any subset of the nodes: its weights are "
        f"{format_bytes(model.total_bytes)}"
        + (f" plus {format_bytes(kv)} of KV cache budget" if kv else "")
        + f", and the nodes have {format_bytes(total)} together ({listing}). Add nodes, lower "
        "generation.max_context, or use a smaller or more quantized model."
    )


def _why_left_out(
    node: str,
    model: ModelInfo,
    cluster: ClusterProfile,
    t: Tables,
    used: set[str],
    objective: str,
    kv_tokens: int,
) -> str:
    n = t.names.index(node)
    if not t.fits_mid[n].any() and not t.fits_first[n].any() and not t.fits_last[n].any():
        return f"its memory ({format_bytes(cluster.node(node).memory_bytes)}) cannot hold one layer"
    per_layer = t.compute[n, 0, t.num_layers] / t.num_layers
    fastest = min(t.compute[t.names.index(u), 0, t.num_layers] / t.num_layers for u in used)
    hops = [cluster.link(u, node).latency_s for u in used] + [cluster.link(node, u).latency_s for u in used]
    power = cluster.node(node).power
    return (
        f"the {objective} objective is better without it: it computes a layer in "
        f"{per_layer * 1e3:.2f} ms (fastest serving node {fastest * 1e3:.2f} ms), its cheapest link "
        f"to a serving node is {min(hops) * 1e3:.2f} ms one-way, it idles at {power.idle_w:.0f} W "
        f"({power.basis})"
    )
