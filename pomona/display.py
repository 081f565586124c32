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


def _prediction_text(p: coordinator_pb2.Prediction) -> str:
    return (
        f"decode {p.decode_tok_s:.2f} tok/s, TTFT {p.ttft_s:.3f} s, {p.j_per_token:.3f} J/token "
        f"[{p.energy_basis}], bottleneck {p.bottleneck}"
    )


def prediction_lines(status: coordinator_pb2.ClusterStatus) -> list[str]:
    """The scheduler's choice: objective, predicted figures, baselines, nodes left out."""
    if not status.HasField("predicted"):
        return []
    lines = [f"placement: {status.objective}; predicted {_prediction_text(status.predicted)}"]
    for option in status.baselines:
        stages = " ".join(f"{s.node}[{s.layer_start},{s.layer_end})" for s in option.stages)
        if option.HasField("predicted"):
            p = option.predicted
            lines.append(
                f"  baseline {option.name:<8} {p.decode_tok_s:.2f} tok/s, TTFT {p.ttft_s:.3f} s, "
                f"{p.j_per_token:.3f} J/token  {stages}"
            )
        else:
            lines.append(f"  baseline {option.name:<8} infeasible ({option.note})")
    if status.expert_load:
        lines.append(f"expert load: {status.expert_load}")
    if status.plan_note:
        lines.append(f"note: {status.plan_note}")
    for node in status.left_out:
        lines.append(f"left out: {node.node}: {node.reason}")
    for note in status.power_notes:
        lines.append(f"power estimated on {note}")
    return lines


def scheduler_lines(status: coordinator_pb2.ClusterStatus) -> list[str]:
    """Per stage: predicted vs measured compute per token, hop latency, power and energy."""
    lines = [
        f"{'node':<10} {'predicted ms':>12} {'measured ms':>12} {'hop ms':>8} {'power W':>8} "
        f"{'energy J':>9}  power basis"
    ]
    for stage in status.stages:
        measured = f"{stage.measured_compute_s * 1e3:.2f}" if stage.measured_compute_s else "-"
        hop = f"{stage.hop_latency_s * 1e3:.3f}" if stage.next_node else "-"
        lines.append(
            f"{stage.node:<10} {stage.predicted_compute_s * 1e3:>12.2f} {measured:>12} {hop:>8} "
            f"{stage.power_w:>8.1f} {stage.energy_j:>9.1f}  {stage.power_basis}"
        )
    if status.energy_basis:
        lines.append(f"energy since up: {status.energy_j:.1f} J [{status.energy_basis}]")
    return lines


def status_json(status: coordinator_pb2.ClusterStatus) -> dict:
    """`pomona status --json`: the cluster, every stage with its scheduler figures, predictions."""
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(
        status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data
