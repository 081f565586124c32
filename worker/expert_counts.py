"""Counting the router's choices in a stage's own MoE layers, for the scheduler's expert load.

Layers whose experts are spread over nodes count in `DistributedSwitchGLU`, and expert-only nodes
in `ExpertHost`; a layer whose experts all stay on its stage node runs mlx-lm's SwitchGLU
untouched, so this wraps it with a counter. The count is kept on the device and updated inside
the forward's own graph (a scatter-add of the routing indices), so counting never makes the host
wait mid-forward; the host reads it only when `ExpertStats` is asked, under the engine's MLX lock.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .experts import DistributedSwitchGLU, ExpertStats
from .families.base import expert_count, is_expert_module


class CountedExperts(nn.Module):
    """mlx-lm's expert module, called unchanged, that also counts the experts it is asked for."""

    def __init__(self, experts: nn.Module, num_experts: int):
        super().__init__()
        self.experts = experts
        self._counts = mx.zeros((num_experts,), dtype=mx.int32)  # "_": not a parameter

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        self._counts = self._counts.at[indices.reshape(-1)].add(1)
        mx.async_eval(self._counts)  # keeps the count's graph one step long
        return self.experts(x, indices)

    def counts(self) -> list[int]:
        return self._counts.tolist()


def count_routed_experts(layers: list[nn.Module], layer_indices: list[int], stats: ExpertStats) -> int:
    """Wrap every whole expert module of `layers` (model layer numbers `layer_indices`) with a
    counter reporting to `stats`; returns how many were wrapped. Modules found structurally."""
    wrapped = 0
    for layer_index, layer in zip(layer_indices, layers):
        found = [
            (path, module)
            for path, module in layer.named_modules()
            if is_expert_module(module)
        ]
        for path, module in found:
            parent_path, _, name = path.rpartition(".")
            parent = layer
            for part in parent_path.split(".") if parent_path else ():
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            if isinstance(parent, DistributedSwitchGLU):  # its local part: it counts for itself
                continue
            counted = CountedExperts(module, expert_count(module))
            parent[name] = counted
            stats.add_counter(layer_index, counted.counts)
            wrapped += 1
    return wrapped
