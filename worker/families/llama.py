"""Llama (dense): full attention, optionally interleaved with sliding-window layers."""

from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .base import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    def tied_embeddings(self, model) -> bool:
        return bool(model.args.tie_word_embeddings)

    def _sliding(self, model, layer_index: int) -> bool:
        return model.args.layer_types[layer_index] == "sliding_attention"

    def make_cache(self, model, layer_index: int):
        if self._sliding(model, layer_index):
            return RotatingKVCache(max_size=model.args.sliding_window)
        return KVCache()

    def masks(self, model, hidden, layer_indices, caches):
        # One mask per attention kind, each from a cache of that kind (as mlx-lm's LlamaModel does).
        by_kind = {}
        masks = []
        for index, cache in zip(layer_indices, caches):
            sliding = self._sliding(model, index)
            if sliding not in by_kind:
                window = model.args.sliding_window if sliding else None
                by_kind[sliding] = create_attention_mask(hidden, cache, window_size=window)
            masks.append(by_kind[sliding])
        return masks
