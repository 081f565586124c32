"""Expert load: how often the router picks each routed expert, from the cluster's own history.

Workers count the tokens each of their experts computes (`worker.experts.ExpertStats`). When a
cluster stops, the coordinator adds every node's counts to one file per model in its state
directory (`.pomona/expert_load/<model key>.json`), so the next `pomona up` or `pomona plan` of the
same model in that directory places by them: the cost model weighs each expert by its share of
the routed work instead of assuming uniform routing, experts that must leave a full stage node are
the least used ones, and the most used experts get replicas where the cost model says that pays
(`pomona.expert_replicas`).

Shares are smoothed (add-one), so a short history moves the plan only a little and an expert
never seen still has a small share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pomona.modelinfo import ModelInfo

log = logging.getLogger(__name__)

Counts = dict[int, dict[int, int]]  # layer -> expert id -> routed tokens


@dataclass(frozen=True)
class ExpertLoad:
    """Each MoE layer's share of routed tokens per expert (each layer's shares sum to 1)."""

    layers: tuple[tuple[int, tuple[float, ...]], ...]  # (layer, share of expert 0, 1, ...)
    tokens: int  # routed (token, expert) pairs behind the figures
    source: str  # where they came from, for people

    @cached_property
    def _by_layer(self) -> dict[int, tuple[float, ...]]:
        return dict(self.layers)

    def share(self, layer: int, expert: int, num_experts: int) -> float:
        """Fraction of `layer`'s routed work that goes to `expert` (uniform for an unseen layer)."""
        shares = self._by_layer.get(layer)
        if shares is None or expert >= len(shares):
            return 1.0 / num_experts
        return shares[expert]

    @classmethod
    def from_counts(
        cls, counts: Mapping[int, Mapping[int, int]], num_experts: int, source: str
    ) -> ExpertLoad:
        layers = []
        total = 0
        for layer in sorted(counts):
            per_expert = [max(int(counts[layer].get(e, 0)), 0) for e in range(num_experts)]
            layer_total = sum(per_expert)
            total += layer_total
            layers.append(
                (layer, tuple((count + 1) / (layer_total + num_experts) for count in per_expert))
            )
        return cls(tuple(layers), total, source)


def model_key(model: ModelInfo) -> str:
    """One file per model: its resolved path and shape (a different checkpoint, a new file)."""
    identity = f"{Path(model.path).resolve()}|{model.architecture}|{model.num_layers}|{model.num_experts}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def history_path(directory: Path, model: ModelInfo) -> Path:
    return Path(directory) / "expert_load" / f"{model_key(model)}.json"


def read_counts(directory: Path, model: ModelInfo) -> Counts:
    """The counts stored for `model` (empty when there are none or the file is unreadable)."""
    path = history_path(directory, model)
    try:
        data = json.loads(path.read_text())
        return {
            int(layer): {int(e): int(n) for e, n in experts.items()}
            for layer, experts in data["layers"].items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("ignoring unreadable expert statistics %s (%s); delete it to start afresh", path, error)
        return {}


def add_counts(directory: Path, model: ModelInfo, new: Mapping[int, Mapping[int, int]]) -> Path:
    """Add `new` to the counts stored for `model` (atomically); returns the file's path."""
    merged = read_counts(directory, model)
    for layer, experts in new.items():
        target = merged.setdefault(int(layer), {})
        for expert, count in experts.items():
            target[int(expert)] = target.get(int(expert), 0) + int(count)
    path = history_path(directory, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": str(model.path),
        "architecture": model.architecture,
        "num_experts": model.num_experts,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layers": {
            str(layer): {str(e): n for e, n in sorted(experts.items())}
            for layer, experts in sorted(merged.items())
        },
    }
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".expert_load-")
    with os.fdopen(handle, "w") as file:
        json.dump(document, file, indent=1)
    os.replace(temporary, path)
    return path


def load_history(directory: Path | None, model: ModelInfo) -> ExpertLoad | None:
    """The model's expert load from `directory`'s history, or None (dense model, no history)."""
    if directory is None or not model.is_moe:
        return None
    counts = read_counts(directory, model)
    counts = {layer: experts for layer, experts in counts.items() if layer in model.moe_layers}
    if not any(sum(experts.values()) for experts in counts.values()):
        return None
    path = history_path(directory, model)
    return ExpertLoad.from_counts(counts, model.num_experts, f"measured ({path})")


def counts_from_stats(replies: Iterable) -> Counts:
    """Sum the `ExpertStatsReply` messages of every node into one count per (layer, expert)."""
    counts: Counts = {}
    for reply in replies:
        for entry in reply.layers:
            target = counts.setdefault(entry.layer, {})
            for expert, tokens in zip(entry.expert_ids, entry.tokens):
                target[expert] = target.get(expert, 0) + int(tokens)
    return counts
