"""How a plan is shown: the chosen placement beside the baselines, as text and as JSON.

Every energy figure is printed with its basis ("measured (<meter>)" / "estimated (<basis>)").
"""

from __future__ import annotations

from typing import Any

from pomona.costmodel import Prediction
from pomona.experts import expert_groups
from pomona.planner import Plan, PlanOption
from pomona.profiles import ClusterProfile


def prediction_json(prediction: Prediction | None) -> dict[str, Any] | None:
    if prediction is None:
        return None
    return {
        "decode_tok_s": round(prediction.decode_tok_s, 4),
        "ttft_s": round(prediction.ttft_s, 6),
        "throughput_tok_s": round(prediction.throughput_tok_s, 4),
        "j_per_token": round(prediction.j_per_token, 6),
        "prefill_j": round(prediction.prefill_j, 6),
        "energy_basis": prediction.energy_basis,
        "bottleneck": prediction.bottleneck,
        "stages": [
            {
                "node": stage.node,
                "decode_compute_s": stage.decode_compute_s,
                "dispatch_s": stage.dispatch_s,
                "hop_s": stage.hop_s,
                "next_node": stage.next_node,
            }
            for stage in prediction.stages
        ],
        "nodes": [
            {"node": n.node, "busy_s": n.busy_s, "idle_w": n.idle_w, "busy_w": n.busy_w,
             "power_basis": n.power_basis}
            for n in prediction.nodes
        ],
    }


def option_json(option: PlanOption) -> dict[str, Any]:
    placement = option.placement
    return {
        "name": option.name,
        "feasible": placement is not None,
        "note": option.note,
        "stages": [
            {"node": s.node, "layers": [s.layers.start, s.layers.end]} for s in placement.stages
        ] if placement else [],
        "experts": [
            {"node": node, "layer": layer, "experts": list(ids)}
            for node, layer, ids in expert_groups(placement.experts)
            if not any(s.node == node and layer in s.layers for s in placement.stages)
        ] if placement else [],
        "predicted": prediction_json(option.prediction),
    }


def plan_json(plan: Plan, cluster: ClusterProfile) -> dict[str, Any]:
    return {
        "objective": plan.objective,
        "workload": {
            "prompt_tokens": plan.workload.prompt_tokens,
            "generated_tokens": plan.workload.generated_tokens,
            "concurrency": plan.workload.concurrency,
            "expert_load": _load_json(plan.workload),
        },
        "chosen": option_json(plan.chosen),
        "baselines": {option.name: option_json(option) for option in plan.baselines},
        "left_out": dict(plan.left_out),
        "nodes": [
            {
                "name": node.name,
                "memory_bytes": node.memory_bytes,
                "machine": node.machine,
                "compute_source": node.compute.source,
                "decode_s_per_token_all_layers": sum(node.compute.decode_layer_s),
                "idle_w": node.power.idle_w,
                "busy_w": node.power.busy_w,
                "power_basis": node.power.basis,
            }
            for node in cluster.nodes
        ],
        "links": [
            {"source": a, "target": b, "latency_s": link.latency_s,
             "latency_p90_s": link.latency_p90_s, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s}
            for (a, b), link in sorted(cluster.links.items())
        ],
    }


def _load_json(workload) -> dict[str, Any] | None:
    load = workload.expert_load
    return None if load is None else {"routed_tokens": load.tokens, "source": load.source}


def _stages_text(option: PlanOption) -> str:
    if option.placement is None:
        return "infeasible"
    text = " ".join(f"{s.node}[{s.layers.start},{s.layers.end})" for s in option.placement.stages)
    spilled = [
        node for node in option.placement.nodes
        if node not in {s.node for s in option.placement.stages}
    ]
    return text + (f" + experts on {','.join(spilled)}" if spilled else "")


def prediction_row(name: str, stages: str, p: Prediction | None) -> str:
    if p is None:
        return f"  {name:<10} {'-':>9} {'-':>9} {'-':>10} {'-':>9}  {stages}"
    return (
        f"  {name:<10} {p.decode_tok_s:>9.2f} {p.ttft_s:>9.3f} {p.throughput_tok_s:>10.2f} "
        f"{p.j_per_token:>9.3f}  {stages}"
    )


def plan_lines(plan: Plan) -> list[str]:
    chosen = plan.chosen.prediction
    w = plan.workload
    lines = [
        f"objective: {plan.objective} (prompt {w.prompt_tokens} tokens, {w.generated_tokens} "
        f"generated, {w.concurrency} stream{'s' if w.concurrency != 1 else ''})",
        f"  {'placement':<10} {'decode/s':>9} {'ttft s':>9} {'thru tok/s':>10} {'J/token':>9}  stages",
        prediction_row("chosen", _stages_text(plan.chosen), chosen),
    ]
    for option in plan.baselines:
        row = prediction_row(option.name, _stages_text(option), option.prediction)
        lines.append(row + (f"  ({option.note})" if option.placement is None else ""))
    if chosen is not None:
        lines.append(f"energy: {chosen.energy_basis}")
        lines.append(f"bottleneck: {chosen.bottleneck}")
    if w.expert_load is not None:
        lines.append(f"expert load: {w.expert_load.tokens} routed tokens, {w.expert_load.source}")
    if plan.chosen.note:
        lines.append(f"note: {plan.chosen.note}")
    for node, reason in plan.left_out.items():
        lines.append(f"left out: {node}: {reason}")
    return lines
