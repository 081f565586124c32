"""Llama 4 (text): chunked local attention on 3 of every 4 layers, global NoPE attention on the 4th,
MoE (sigmoid top-1 plus a shared expert) on every ``interleave_moe_layer_step``-th layer."""

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import ChunkedKVCache, KVCache

from .base import FamilyAdapter


def _is_chunked(layer_index: int) -> bool:
    return (layer_index + 1) % 4 != 0


class Llama4Adapter(FamilyAdapter):
    expert_path = "feed_forward.experts"  # the SwitchGLU a MoE layer calls after routing
    backbone_path = "language_model.model"
    head_path = "language_model.lm_head"

    def tied_embeddings(self, model) -> bool:
        return False

    def make_cache(self, model, layer_index: int):
        if _is_chunked(layer_index):
            return ChunkedKVCache(model.args.text_config.attention_chunk_size)
        return KVCache()

    def masks(self, model, hidden, layer_indices, caches):
        chunk = model.args.text_config.attention_chunk_size
        chunked = [c for i, c in zip(layer_indices, caches) if _is_chunked(i)]
        full = [c for i, c in zip(layer_indices, caches) if not _is_chunked(i)]
        chunk_mask = global_mask = None
        if chunked:
            # Same arithmetic as mlx-lm's Llama 4 model, from this stage's own chunked caches:
            # every chunked cache trims identically, so any one of them gives the window start.
            for cache in chunked:
                cache.maybe_trim_front()
            start, offset = chunked[0].start_position, chunked[0].offset
            end = offset + hidden.shape[1]
            linds = mx.arange(start, end)
            rinds = mx.arange(offset, end)[:, None]
            same_block = (linds // chunk) == (rinds // chunk)
            chunk_mask = same_block & (linds <= rinds)
        if full:
            global_mask = create_attention_mask(hidden, full[0])
        return [chunk_mask if _is_chunked(i) else global_mask for i in layer_indices]
