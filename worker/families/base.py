"""The contract between a pipeline stage and a model family, with the behaviour most families share.

A family's mlx-lm ``Model`` keeps its transformer layers, token embedding and final norm in a
*backbone* module (``model.model`` for most families) and its output projection in a *head*.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache


def child(module: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at a dotted path ("model.layers.3.mlp"), or None where there is none."""
    for part in dotted.split("."):
        if isinstance(module, list):
            index = int(part)
            module = module[index] if index < len(module) else None
        elif isinstance(module, nn.Module) and part in module:
            module = module[part]
        else:
            return None
    return module


class FamilyAdapter:
    """Defaults that hold for llama-like families; subclasses override what differs."""

    backbone_path = "model"  # module with .layers, .embed_tokens, .norm
    head_path = "lm_head"  # output projection, absent when embeddings are tied
    expert_path: str | None = None  # within a layer: the routed experts' module (MoE families)

    def backbone(self, model: nn.Module) -> nn.Module:
        return child(model, self.backbone_path)

    def tied_embeddings(self, model: nn.Module) -> bool:
        return bool(getattr(model.args, "tie_word_embeddings", False))

    def expert_module_path(self, layer: int) -> str | None:
        """Dotted path of layer ``layer``'s routed-expert module (it may not exist: dense layer)."""
        if self.expert_path is None:
            return None
        return f"{self.backbone_path}.layers.{layer}.{self.expert_path}"

    def num_layers(self, model: nn.Module) -> int:
        return len(self.backbone(model).layers)

    def keep_only(self, model: nn.Module, start: int, end: int, is_first: bool, is_last: bool):
        """Drop every module outside the stage, in place, keeping parameter names aligned.

        Layers before ``start`` become ``None`` (like mlx-lm's PipelineMixin) so that layer ``i``
        is still ``layers.i``; layers from ``end`` on are cut off.
        """
        backbone = self.backbone(model)
        backbone.layers = [None] * start + backbone.layers[start:end]
        tied = self.tied_embeddings(model)
        if not is_first and not (is_last and tied):
            del backbone["embed_tokens"]
        if not is_last:
            del backbone["norm"]
            parent, _, name = self.head_path.rpartition(".")
            owner = child(model, parent) if parent else model
            if owner is not None and name in owner:
                del owner[name]

    def embed(self, model: nn.Module, token_ids: mx.array) -> mx.array:
        return self.backbone(model).embed_tokens(token_ids)  # [B, L, D]

    def head(self, model: nn.Module, hidden: mx.array) -> mx.array:
        hidden = self.backbone(model).norm(hidden)
        if self.tied_embeddings(model):
            return self.backbone(model).embed_tokens.as_linear(hidden)
        return child(model, self.head_path)(hidden)  # [B, L, vocab]

    def make_cache(self, model: nn.Module, layer_index: int) -> Any:
        return KVCache()

    def masks(self, model: nn.Module, hidden: mx.array, layer_indices: list[int], caches: list):
        """One attention mask per local layer, built from this stage's own caches."""
        mask = create_attention_mask(hidden, caches[0])
        return [mask] * len(layer_indices)
