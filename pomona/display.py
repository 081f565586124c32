"""Text the CLI shows: the placement table, where expert groups live, expert load statistics."""

from __future__ import annotations

from collections import defaultdict

from pomona.experts import format_ids
from pomona.placement import format_bytes
from pomona.proto import coordinator_pb2


def placement_lines(status: coordinator_pb2.ClusterStatus) -> list[str]:
    lines = [
        f"model: {status.model} ({status.architecture}, {status.num_layers} layers)",
        f"{'node':<10} {'address':<22} {'layers':<12} {'weights':>10} {'rss':>10}  role",
    ]
    for stage in status.stages:
        roles = [r for r, on in (("embed", stage.is_first), ("head", stage.is_last)) if on]
        layers = "-" if stage.experts_only else f"[{stage.layer_start}, {stage.layer_end})"
        if stage.experts_only:
            roles = ["experts"]
        lines.append(
            f"{stage.node:<10} {stage.address:<22} {layers:<12} "
            f"{format_bytes(stage.parameter_bytes):>10} {format_bytes(stage.rss_bytes):>10}  "
            + "+".join(roles)
        )
    if status.expert_groups:
        lines.append("routed experts (layers -> expert ids):")
        by_node: dict[str, dict[tuple[int, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
        for group in status.expert_groups:
            by_node[group.node][tuple(group.expert_ids)].append(group.layer)
        for node, groups in by_node.items():
            text = "; ".join(
                f"layers {format_ids(layers)}: {format_ids(ids)}" for ids, layers in groups.items()
            )
            lines.append(f"  {node:<10} {text}")
    return lines


def expert_stats_lines(stats: coordinator_pb2.ClusterExpertStats) -> list[str]:
    """A per-layer table of tokens per expert (summed over the nodes that computed them), then
    the traffic of each dispatch link."""
    tokens: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for node in stats.nodes:
        for layer in node.stats.layers:
            for expert, count in zip(layer.expert_ids, layer.tokens):
                tokens[layer.layer][expert] += count
    if not tokens:
        return ["no expert statistics yet (no MoE layer is split over nodes, or no request ran)"]
    width = max(max(t) for t in tokens.values()) + 1
    lines = ["tokens per expert (columns: expert ids)",
             "layer " + "".join(f"{e:>7}" for e in range(width))]
    for layer in sorted(tokens):
        row = tokens[layer]
        lines.append(f"{layer:>5} " + "".join(f"{row.get(e, 0):>7}" for e in range(width)))
    links = [(n.node, link) for n in stats.nodes for link in n.stats.links]
    if links:
        lines.append("dispatch links: from -> to, dispatches, bytes sent, bytes received")
        for source, link in links:
            lines.append(
                f"  {source} -> {link.node}: {link.dispatches}, "
                f"{format_bytes(link.bytes_sent)}, {format_bytes(link.bytes_received)}"
            )
    return lines
