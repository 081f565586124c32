"""Expert placement: which nodes hold each MoE layer's routed experts.

An `ExpertMap` maps layer -> routed expert id -> the nodes holding a copy of that expert. It has
every MoE layer of the model with every expert id 0 .. num_experts - 1, and no dense layer, so a
dense model's map is empty. An expert with two or more holders is replicated: any holder may
serve it. A layer's stage node always keeps the layer's attention, router and shared experts; it
holds a routed expert only when the map says so.

The rules (`plan_experts`):
- With `placement.experts` in cluster.yaml, an expert listed for a layer is held by exactly the
  nodes that list it (its stage node too only if that node is one of them); an expert nobody lists
  stays on its stage node. A node may hold experts without running a stage. An entry's layer range
  applies to the MoE layers inside it, so `layers: [0, 8]` on a model whose even layers are dense
  means its odd layers; a range with no MoE layer at all is an error.
- Without it, every expert stays on its stage node unless that node's share does not fit its
  memory; then whole experts move off it, from its last layer back and highest ids first, each
  layer's to one node while that node has room, choosing the node with the most free memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from pomona.errors import PlacementError
from pomona.weight_bytes import format_bytes, held_bytes

if TYPE_CHECKING:
    from pomona.config import ClusterConfig, ExpertSpec
    from pomona.expert_load import ExpertLoad
    from pomona.modelinfo import ModelInfo
    from pomona.placement import StagePlacement

_HINT = "fix placement.experts in cluster.yaml, or remove it to keep every expert with its layer"


class ExpertMap(Mapping[int, Mapping[int, tuple[str, ...]]]):
    """layer -> routed expert id -> the nodes holding it, in the order they were listed.

    Immutable and hashable, so a frozen `Placement` can hold it; layers and ids iterate ascending.
    """

    __slots__ = ("_layers",)

    def __init__(self, layers: Mapping[int, Mapping[int, Iterable[str]]] | None = None) -> None:
        self._layers = {
            layer: {expert: tuple(nodes) for expert, nodes in sorted(experts.items())}
            for layer, experts in sorted((layers or {}).items())
        }

    def __getitem__(self, layer: int) -> Mapping[int, tuple[str, ...]]:
        return MappingProxyType(self._layers[layer])

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __hash__(self) -> int:
        return hash(tuple((layer, tuple(e.items())) for layer, e in self._layers.items()))

    def __repr__(self) -> str:
        return f"ExpertMap({self._layers!r})"

    def holders(self, layer: int, expert: int) -> tuple[str, ...]:
        """The nodes holding `expert` of `layer` (empty for a dense layer)."""
        return self._layers.get(layer, {}).get(expert, ())

    def experts_on(self, node: str, layer: int) -> tuple[int, ...]:
        """The expert ids of `layer` that `node` holds, ascending."""
        return tuple(e for e, nodes in self._layers.get(layer, {}).items() if node in nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node holding at least one expert, in order of first appearance."""
        seen: dict[str, None] = {}
        for experts in self._layers.values():
            for nodes in experts.values():
                seen.update(dict.fromkeys(nodes))
        return tuple(seen)


def expert_groups(expert_map: ExpertMap) -> list[tuple[str, int, tuple[int, ...]]]:
    """(node, layer, expert ids ascending) for display: by layer, then by each node's lowest id."""
    groups = []
    for layer, experts in expert_map.items():
        by_node: dict[str, list[int]] = {}
        for expert, nodes in experts.items():
            for node in nodes:
                by_node.setdefault(node, []).append(expert)
        groups.extend((node, layer, tuple(ids)) for node, ids in by_node.items())
    return groups


def format_ids(ids: Iterable[int]) -> str:
    """Sorted ids with runs collapsed: [0, 1, 2, 3, 7, 9, 10] -> "0-3, 7, 9-10"."""
    runs: list[list[int]] = []
    for value in sorted(set(ids)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _dense_text(start: int, end: int) -> str:
    if end - start == 1:
        return f"layer {start} is a dense layer"
    return f"layers {start} to {end - 1} are all dense layers"


def validate_experts(
    specs: Sequence[ExpertSpec], model: ModelInfo, *, node_names: Collection[str] | None = None
) -> None:
    """Check explicit expert groups against the model (and the cluster's node names, when given)
    before anything loads; raise PlacementError naming the entry and the offending ids or layers."""
    moe = set(model.moe_layers)
    for index, spec in enumerate(specs):
        start, end = spec.layers
        this = f"placement.experts[{index}] (node {spec.node!r}, layers [{start}, {end}))"
        if node_names is not None and spec.node not in node_names:
            known = ", ".join(repr(name) for name in node_names)
            raise PlacementError(f"{this} names an unknown node; nodes are: {known}; {_HINT}")
        if not model.is_moe:
            raise PlacementError(
                f"{this}: the model has no routed experts (it is dense), so there is nothing to "
                "place; remove placement.experts from cluster.yaml"
            )
        if not 0 <= start < end:
            raise PlacementError(f"{this}: the layer range is empty or negative; {_HINT}")
        if end > model.num_layers:
            raise PlacementError(
                f"{this} goes past the model's last layer: the model has {model.num_layers} "
                f"layers (0 to {model.num_layers - 1}); {_HINT}"
            )
        if not moe.intersection(range(start, end)):
            raise PlacementError(
                f"{this}: {_dense_text(start, end)}, with no experts; the model's MoE layers "
                f"are {format_ids(model.moe_layers)}; {_HINT}"
            )
        if not spec.experts:
            raise PlacementError(f"{this} lists no experts; {_HINT}")
        outside = [e for e in spec.experts if not 0 <= e < model.num_experts]
        if outside:
            raise PlacementError(
                f"{this}: expert ids {format_ids(outside)} are outside the "
                f"model's range: each MoE layer has {model.num_experts} experts, ids 0 to "
                f"{model.num_experts - 1}; {_HINT}"
            )
        twice = sorted(e for e, count in Counter(spec.experts).items() if count > 1)
        if twice:
            raise PlacementError(f"{this} lists expert {format_ids(twice)} more than once; {_HINT}")


def plan_experts(
    config: ClusterConfig,
    model: ModelInfo,
    stages: Sequence[StagePlacement],
    capacities_by_node: Mapping[str, int],
) -> ExpertMap:
    """Where every routed expert lives; see the module docstring for the rules.

    capacities_by_node: usable bytes per node (memory_gb already applied); only the automatic
    spreading reads it. Whether explicit groups fit is `check_fit`'s job, after this.
    """
    if config.experts:
        validate_experts(config.experts, model, node_names=[node.name for node in config.nodes])
    if not model.is_moe:
        return ExpertMap()
    listed: dict[int, dict[int, list[str]]] = {}
    for spec in config.experts:
        for layer in range(*spec.layers):
            if layer in model.moe_layers:
                for expert in spec.experts:
                    nodes = listed.setdefault(layer, {}).setdefault(expert, [])
                    if spec.node not in nodes:
                        nodes.append(spec.node)
    stage_of = {layer: stage.node for stage in stages for layer in stage.layers}
    holders: dict[int, dict[int, tuple[str, ...]]] = {}
    for layer in model.moe_layers:
        chosen = listed.get(layer, {})
        holders[layer] = {
            e: tuple(chosen.get(e, ())) or ((stage_of[layer],) if layer in stage_of else ())
            for e in range(model.num_experts)
        }
        unheld = [e for e, nodes in holders[layer].items() if not nodes]
        if unheld:
            raise PlacementError(
                f"experts {format_ids(unheld)} of layer {layer} are held by no node: no stage runs "
                f"layer {layer} and placement.experts does not list them; {_HINT}"
            )
    if not config.experts:
        order = [node.name for node in config.nodes]
        order += [name for name in capacities_by_node if name not in order]
        _spread(model, stages, holders, capacities_by_node, order)
    return ExpertMap(holders)


def plan_experts_for_stages(
    model: ModelInfo,
    stages: Sequence[StagePlacement],
    capacities_by_node: Mapping[str, int],
    link_cost: Callable[[str, str], float],
    load: ExpertLoad | None = None,
) -> ExpertMap:
    """The scheduler's expert map: every expert on its layer's stage node, except where a stage
    node's share does not fit its memory; then whole experts move, as in `plan_experts`, but to
    the node with the cheapest link from the stage (`link_cost(stage_node, node)`, seconds) among
    those with room, the roomiest first on a tie. With a measured `load`, the least used experts
    of a layer move first, so the most used ones stay local."""
    if not model.is_moe:
        return ExpertMap()
    stage_of = {layer: stage.node for stage in stages for layer in stage.layers}
    holders = {
        layer: {e: (stage_of[layer],) for e in range(model.num_experts)} for layer in model.moe_layers
    }
    _spread(model, stages, holders, capacities_by_node, list(capacities_by_node), link_cost, load)
    return ExpertMap(holders)


def _spread(
    model: ModelInfo,
    stages: Sequence[StagePlacement],
    holders: dict[int, dict[int, tuple[str, ...]]],
    capacities: Mapping[str, int],
    order: list[str],
    link_cost: Callable[[str, str], float] | None = None,
    load: ExpertLoad | None = None,
) -> None:
    """Move whole experts off every stage node whose share exceeds its memory (in place); to the
    roomiest node, or with `link_cost`, to the one with the cheapest link from the stage node."""
    used = held_bytes(model, stages, holders)
    initial = dict(used)

    def free(node: str) -> int:
        return capacities.get(node, 0) - used.get(node, 0)

    for stage in stages:
        node = stage.node
        if node not in capacities:
            raise PlacementError(f"no memory figure for node {node!r}; set memory_gb for it")
        if free(node) >= 0:
            continue
        moe_layers = [layer for layer in stage.layers if model.expert_bytes[layer]]
        for layer in reversed(moe_layers):
            size, destination = model.expert_bytes[layer], None
            leaving = reversed(range(model.num_experts))
            if load is not None:  # coldest first; equal shares: highest id first, as without
                leaving = sorted(leaving, key=lambda e: load.share(layer, e, model.num_experts))  # noqa: B023
            for expert in leaving:
                if free(node) >= 0:
                    break
                if destination is None or free(destination) < size:
                    # Keep a layer's moved experts together: fewer nodes to dispatch to per token.
                    roomy = [n for n in order if n != node and free(n) >= size]
                    if link_cost is None:
                        destination = max(roomy, key=free) if roomy else None
                    else:
                        costs = {n: (link_cost(node, n), -free(n)) for n in roomy}
                        destination = min(roomy, key=costs.__getitem__) if roomy else None
                    if destination is None:
                        break
                holders[layer][expert] = (destination,)
                used[node] -= size
                used[destination] = used.get(destination, 0) + size
        if free(node) < 0:
            moved = initial[node] - used[node]
            raise _does_not_fit(model, stage, capacities, initial, moved, order)


def _does_not_fit(
    model: ModelInfo,
    stage: StagePlacement,
    capacities: Mapping[str, int],
    initial: Mapping[str, int],
    moved: int,
    order: list[str],
) -> PlacementError:
    node, capacity = stage.node, capacities[stage.node]
    needed = initial[node]
    own_experts = sum(model.num_experts * model.expert_bytes[layer] for layer in stage.layers)
    if needed - own_experts > capacity:
        detail = (
            f"even with every expert of its layers on other nodes it needs "
            f"{format_bytes(needed - own_experts)}"
        )
    else:
        room = {n: capacities.get(n, 0) - initial.get(n, 0) for n in order if n != node}
        room = {n: size for n, size in room.items() if size > 0}
        listing = ", ".join(f"{n!r} {format_bytes(size)}" for n, size in room.items())
        detail = (
            f"moving experts out would need {format_bytes(needed - capacity)} free on other nodes, "
            f"and they had room for {format_bytes(moved)} of its experts"
            + (f" (free: {listing})" if listing else " (no other node has free memory)")
        )
    return PlacementError(
        f"the model does not fit: node {node!r} needs {format_bytes(needed)} for layers "
        f"{stage.layers} with all their experts but has {format_bytes(capacity)}; {detail}. Add "
        "nodes, set `memory_gb` in cluster.yaml if a measurement is wrong, place experts "
        "yourself with placement.experts, or use a smaller or more quantized model."
    )
