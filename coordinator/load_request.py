"""What each node loads: the LoadShard request built from a placement (pure).

A stage node gets its layer range, its place in the ring and the address of the next stage; every
node gets the routed experts the placement gives it, and a stage node whose MoE layers have
experts elsewhere gets where those live.
"""

from __future__ import annotations

from collections.abc import Mapping

from pomona.placement import Placement
from pomona.proto import worker_pb2


def micro_batch_count(configured: int | None, stage_hostnames: list[str]) -> int:
    """Decode micro-batches to keep in flight: ``generation.micro_batches`` when set, else one
    per machine the stages run on (by the hostname each worker reports). Stages on one machine
    share its cores: more micro-batches there cost per-step work and overlap little (measured in
    ``bench/serve_bench.py``)."""
    return configured or max(1, len(set(stage_hostnames)))


def load_request(
    model_path: str,
    placement: Placement,
    addresses: Mapping[str, str],
    node: str,
    micro_batches: int = 0,
    prompt_cache_tokens: int = 0,
) -> worker_pb2.LoadShardRequest:
    """What ``node`` loads: its stage (if any) and the routed experts the placement gives it;
    the first stage also how many decode micro-batches to keep in flight (0: one per stage) and
    the prompt cache's budget in tokens (0: none)."""
    experts = placement.experts
    request = worker_pb2.LoadShardRequest(model_path=model_path, node_name=node)
    own_layers: range = range(0)
    stage_nodes = [stage.node for stage in placement.stages]
    if node in stage_nodes:
        index = stage_nodes.index(node)
        stage = placement.stages[index]
        next_stage = placement.stages[(index + 1) % len(placement.stages)]
        own_layers = range(stage.layers.start, stage.layers.end)
        request.layer_start, request.layer_end = stage.layers.start, stage.layers.end
        request.is_first, request.is_last = stage.is_first, stage.is_last
        request.next_address = addresses[next_stage.node]
        request.next_node = next_stage.node
        request.stage_index, request.stage_count = index, len(placement.stages)
        if index == 0:
            request.micro_batches = micro_batches
            request.prompt_cache_tokens = prompt_cache_tokens
    else:
        request.experts_only = True
    for layer in sorted(experts):
        held = experts.experts_on(node, layer)
        if layer not in own_layers:
            if held:
                request.experts.add(layer=layer, expert_ids=held)
            continue
        others = [n for n in experts.nodes if n != node and experts.experts_on(n, layer)]
        if not others:
            continue  # every expert of this layer is here: the layer runs as mlx-lm's own
        request.experts.add(layer=layer, expert_ids=held)
        for other in others:
            request.remote_experts.add(
                layer=layer,
                node=other,
                address=addresses[other],
                expert_ids=experts.experts_on(other, layer),
            )
    return request
