"""Placement as data, and the pure planner that produces it.

A `Placement` is the pipeline: stages in order, each a node holding a half-open layer range
`[start, end)`; the first stage also holds the token embedding, the last the final norm and head.
`plan_placement` turns a cluster config, a model description and each node's usable memory (bytes)
into a Placement: explicit stages from cluster.yaml are validated, otherwise `assign_layers` splits
the layers so each node's share of the weights is proportional to its memory. Nothing here does
I/O; every failure is a `PlacementError` that names the stage or node and says what to do.

For MoE models the Placement also carries an `ExpertMap` (layer -> expert -> holding nodes), made
by `pomona.experts.plan_experts`; `check_fit` counts what every node holds (`node_bytes`), so
experts spread over other nodes and replicas are accounted for. Dense models get an empty map.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pomona.errors import PlacementError
from pomona.experts import ExpertMap, expert_groups, format_ids, plan_experts, validate_experts
from pomona.weight_bytes import GIB, format_bytes, held_bytes, shard_bytes

if TYPE_CHECKING:
    from pomona.config import ClusterConfig, StageSpec
    from pomona.modelinfo import ModelInfo

__all__ = [  # the expert and byte helpers are re-exported: callers import placement from here
    "GIB",
    "ExpertMap",
    "LayerRange",
    "Placement",
    "StagePlacement",
    "assign_layers",
    "check_fit",
    "expert_groups",
    "format_bytes",
    "format_ids",
    "node_bytes",
    "plan_experts",
    "plan_placement",
    "shard_bytes",
    "validate_experts",
    "validate_stages",
]


@dataclass(frozen=True)
class LayerRange:
    """Layers `start, start + 1, ..., end - 1` (half-open, like Python's range)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"invalid layer range [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer < self.end

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


@dataclass(frozen=True)
class StagePlacement:
    node: str
    layers: LayerRange
    is_first: bool  # holds the token embedding
    is_last: bool  # holds the final norm and the head, and samples


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlacement, ...]  # in pipeline order
    # layer -> routed expert -> nodes holding it; empty for a dense model
    experts: ExpertMap = field(default_factory=ExpertMap)

    @property
    def num_layers(self) -> int:
        return self.stages[-1].layers.end if self.stages else 0

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node with a stage (pipeline order) or experts (expert-only nodes after)."""
        names = [stage.node for stage in self.stages]
        return tuple(names + [node for node in self.experts.nodes if node not in names])

    def stage_of(self, node: str) -> StagePlacement:
        for stage in self.stages:
            if stage.node == node:
                return stage
        raise KeyError(node)

    def stage_for_layer(self, layer: int) -> StagePlacement:
        for stage in self.stages:
            if layer in stage.layers:
                return stage
        raise KeyError(layer)


def node_bytes(model: ModelInfo, placement: Placement) -> dict[str, int]:
    """Bytes of weights each node holds: its stage without routed experts, plus the experts it
    holds (a replica counts on every holder). Expert-only nodes are included."""
    return held_bytes(model, placement.stages, placement.experts)


def assign_layers(
    layer_bytes: Sequence[int], embed_bytes: int, head_bytes: int, capacities: Sequence[int]
) -> list[LayerRange]:
    """Split layers into len(capacities) contiguous, non-empty stages, in order.

    Stage i holds its layers, plus `embed_bytes` when first and `head_bytes` when last; its load
    ratio is that total over capacities[i]. The split minimizes the largest load ratio (so if any
    split fits, this one does), and among the splits reaching that minimum it takes the one with
    the smallest sum of squared ratios, which evens out the stages that are not the bottleneck.
    Both are exact dynamic programs over split points: O(stages * layers^2).
    """
    num_layers, num_stages = len(layer_bytes), len(capacities)
    if num_stages == 0:
        raise PlacementError("there are no nodes to place the model on; add nodes to cluster.yaml")
    if num_stages > num_layers:
        raise PlacementError(
            f"{num_stages} nodes but the model has only {num_layers} layers, and every stage needs "
            "at least one layer; remove nodes from cluster.yaml or list explicit placement stages"
        )
    if any(capacity <= 0 for capacity in capacities):
        raise PlacementError(f"every node needs memory for weights; capacities are {capacities}")

    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + size)

    def ratio(stage: int, start: int, end: int) -> float:
        load = prefix[end] - prefix[start]
        load += embed_bytes if stage == 0 else 0
        load += head_bytes if stage == num_stages - 1 else 0
        return load / capacities[stage]

    # Stage k ends at layer i, for i in [k + 1, num_layers - (num_stages - 1 - k)]: every stage
    # before it and after it keeps at least one layer.
    def ends(stage: int) -> range:
        return range(stage + 1, num_layers - (num_stages - 1 - stage) + 1)

    inf = float("inf")
    # Phase 1: bottleneck[k][i] = smallest possible max ratio of stages 0..k covering layers [0, i).
    bottleneck = [[inf] * (num_layers + 1) for _ in range(num_stages)]
    for i in ends(0):
        bottleneck[0][i] = ratio(0, 0, i)
    for k in range(1, num_stages):
        for i in ends(k):
            bottleneck[k][i] = min(max(bottleneck[k - 1][j], ratio(k, j, i)) for j in range(k, i))
    # Ratios are floats of exact integers; the slack only keeps rounding from excluding the optimum.
    limit = bottleneck[-1][num_layers] * (1 + 1e-9)

    # Phase 2: among splits whose every ratio is <= limit, the smallest sum of squared ratios.
    cost = [[inf] * (num_layers + 1) for _ in range(num_stages)]
    previous_end = [[0] * (num_layers + 1) for _ in range(num_stages)]
    for i in ends(0):
        if ratio(0, 0, i) <= limit:
            cost[0][i] = ratio(0, 0, i) ** 2
    for k in range(1, num_stages):
        for i in ends(k):
            for j in range(k, i):
                r = ratio(k, j, i)
                if r <= limit and cost[k - 1][j] + r * r < cost[k][i]:
                    cost[k][i], previous_end[k][i] = cost[k - 1][j] + r * r, j

    ranges: list[LayerRange] = []
    end = num_layers
    for k in range(num_stages - 1, -1, -1):
        start = previous_end[k][end] if k > 0 else 0
        ranges.append(LayerRange(start, end))
        end = start
    return ranges[::-1]


def _describe(index: int, spec: StageSpec) -> str:
    return f"stage {index} (node {spec.node!r}, layers [{spec.start}, {spec.end}))"


def validate_stages(specs: Sequence[StageSpec], num_layers: int) -> list[LayerRange]:
    """Check explicit stages tile [0, num_layers) in order; return their ranges."""
    hint = "fix placement.stages in cluster.yaml, or remove `placement:` for automatic placement"
    if not specs:
        raise PlacementError(f"placement lists no stages; {hint}")
    ranges: list[LayerRange] = []
    previous_end = 0
    for index, spec in enumerate(specs):
        this = _describe(index, spec)
        if not 0 <= spec.start < spec.end:
            raise PlacementError(f"{this} is empty or negative; {hint}")
        if spec.end > num_layers:
            raise PlacementError(
                f"{this} goes past the model's last layer: the model has {num_layers} layers "
                f"(0 to {num_layers - 1}); {hint}"
            )
        if index == 0 and spec.start != 0:
            raise PlacementError(
                f"{this} must start at layer 0, or layers 0 to {spec.start - 1} run nowhere; {hint}"
            )
        if spec.start < previous_end:
            raise PlacementError(
                f"{this} overlaps {_describe(index - 1, specs[index - 1])}: layers "
                f"{spec.start} to {min(previous_end, spec.end) - 1} would run twice; {hint}"
            )
        if spec.start > previous_end:
            raise PlacementError(
                f"gap before {this}: layers {previous_end} to {spec.start - 1} run nowhere; {hint}"
            )
        ranges.append(LayerRange(spec.start, spec.end))
        previous_end = spec.end
    if previous_end != num_layers:
        raise PlacementError(
            f"layers {previous_end} to {num_layers - 1} run nowhere: the last stage, "
            f"{_describe(len(specs) - 1, specs[-1])}, must end at {num_layers}; {hint}"
        )
    return ranges


def _holding(placement: Placement, node: str) -> str:
    """What a node holds, for messages: "layers [0, 2)", "6 experts of layers 2-3", or both."""
    parts = [f"layers {s.layers}" for s in placement.stages if s.node == node]
    own = {layer for s in placement.stages if s.node == node for layer in s.layers}
    foreign = [
        (layer, expert)
        for layer, experts in placement.experts.items()
        if layer not in own
        for expert, nodes in experts.items()
        if node in nodes
    ]
    if foreign:
        layers = {layer for layer, _ in foreign}
        noun = "layer" if len(layers) == 1 else "layers"
        parts.append(f"{len(foreign)} experts of {noun} {format_ids(layers)}")
    return " and ".join(parts)


def check_fit(model: ModelInfo, placement: Placement, capacities_by_node: dict[str, int]) -> None:
    """Raise PlacementError listing every node whose share of the weights exceeds its memory."""
    needed = node_bytes(model, placement)
    problems = []
    for node, size in needed.items():
        if node not in capacities_by_node:
            raise PlacementError(f"no memory figure for node {node!r}; set memory_gb for it")
        available = capacities_by_node[node]
        if size > available:
            needs = f"needs {format_bytes(size)} for {_holding(placement, node)}"
            problems.append(f"node {node!r} {needs} but has {format_bytes(available)}")
    if problems:
        total_available = sum(capacities_by_node[node] for node in needed)
        raise PlacementError(
            "the model does not fit: "
            + "; ".join(problems)
            + f" (the weights total {format_bytes(sum(needed.values()))} across these nodes, "
            f"which have {format_bytes(total_available)} together). Add nodes, set `memory_gb` in "
            "cluster.yaml if a measurement is wrong, move layers between stages"
            + (", move experts with placement.experts" if model.is_moe else "")
            + ", or use a smaller or more quantized model."
        )


def plan_placement(
    config: ClusterConfig, model: ModelInfo, capacities_by_node: dict[str, int]
) -> Placement:
    """The pipeline and expert map for this cluster and model; `memory_gb` in the config
    overrides measurements.

    capacities_by_node: usable bytes per node name, as measured by the workers.
    """
    capacities: dict[str, int] = {}
    for node in config.nodes:
        if node.memory_gb is not None:
            capacities[node.name] = int(node.memory_gb * GIB)
        elif node.name in capacities_by_node:
            capacities[node.name] = capacities_by_node[node.name]
        else:
            raise PlacementError(
                f"node {node.name!r} reported no memory figure; set memory_gb for it in "
                f"{config.path}"
            )
    # `capacities` now has every node of the cluster, memory_gb applied.
    if config.stages is not None:
        names = [spec.node for spec in config.stages]
        ranges = validate_stages(config.stages, model.num_layers)
    else:
        names = [node.name for node in config.nodes]
        ranges = assign_layers(
            model.layer_bytes, model.embed_bytes, model.head_bytes, [capacities[n] for n in names]
        )
    last = len(names) - 1
    stages = tuple(
        StagePlacement(name, layers, is_first=index == 0, is_last=index == last)
        for index, (name, layers) in enumerate(zip(names, ranges, strict=True))
    )
    placement = Placement(stages, plan_experts(config, model, stages, capacities))
    check_fit(model, placement, capacities)
    return placement
