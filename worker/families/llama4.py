"""Llama 4 (text): why the generic adapter is not enough.

Three of every four layers use chunked local attention (a ``ChunkedKVCache``), the fourth global
NoPE attention; MoE (sigmoid top-1 plus a shared expert) on every ``interleave_moe_layer_step``-th
layer. mlx-lm's LlamaModel builds the chunk mask in its own ``__call__`` (the cache's
``make_mask`` gives a plain causal one) and trims the chunked caches there, so this adapter builds
that mask the same way, and embeds with the embedding directly: the backbone's ``__call__`` cannot
run without the caches it trims.
"""

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import ChunkedKVCache

from .base import StageAdapter


class Llama4Adapter(StageAdapter):
    def embed(self, token_ids):
        return self.backbone[self.embed_name](token_ids)  # [B, L, D]

    def masks(self, hidden, layer_indices, caches):
        chunk = self.model.args.text_config.attention_chunk_size
        chunked = [c for c in caches if isinstance(c, ChunkedKVCache)]
        full = [c for c in caches if not isinstance(c, ChunkedKVCache)]
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
        return [chunk_mask if isinstance(c, ChunkedKVCache) else global_mask for c in caches]
