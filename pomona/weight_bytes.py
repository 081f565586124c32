"""Bytes of weights a stage or a node holds, and sizes written for people.

A node holds its stage's layers without their routed experts (attention, routers, shared
experts: they always stay with the layer), plus every routed expert it is a holder of, whichever
stage runs that expert's layer; a replicated expert counts on each of its holders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pomona.modelinfo import ModelInfo
    from pomona.placement import LayerRange, StagePlacement

GIB = 2**30


def format_bytes(num_bytes: float) -> str:
    """Bytes for people: GiB for big amounts, MiB below one GiB."""
    if num_bytes >= GIB:
        return f"{num_bytes / GIB:.2f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


def shard_bytes(model: ModelInfo, layers: LayerRange, is_first: bool, is_last: bool) -> int:
    """Bytes of weights a stage holds: its layers, plus the embedding first, norm and head last."""
    total = sum(model.layer_bytes[layers.start : layers.end])
    if is_first:
        total += model.embed_bytes
    if is_last:
        total += model.head_bytes
        if is_first and model.tied_embeddings:
            # head_bytes counts the tied embedding again for a last stage that lacks it; one stage
            # holding both shares a single copy.
            total -= model.embed_bytes
    return total


def held_bytes(
    model: ModelInfo,
    stages: Iterable[StagePlacement],
    expert_map: Mapping[int, Mapping[int, tuple[str, ...]]],
) -> dict[str, int]:
    """Bytes each node holds. An MoE layer's expert missing from expert_map is on its stage node
    (so a map left empty means today's behaviour: every expert with its layer)."""
    held: dict[str, int] = {}
    for stage in stages:
        held.setdefault(stage.node, 0)
        size = shard_bytes(model, stage.layers, stage.is_first, stage.is_last)
        for layer in stage.layers:
            if model.expert_bytes[layer]:
                size -= model.num_experts * model.expert_bytes[layer]
                experts = expert_map.get(layer, {})
                for expert in range(model.num_experts):
                    for node in experts.get(expert) or (stage.node,):
                        held[node] = held.get(node, 0) + model.expert_bytes[layer]
        held[stage.node] += size
    return held
