"""The caches of one decode micro-batch at one stage, kept across steps (continuous batching).

Stage 0 groups the requests that decode into micro-batches and names, in every step it sends, the
requests of that step in order. Each stage keeps, per micro-batch, one batch cache per layer (mlx-lm's
``BatchKVCache`` / ``BatchRotatingKVCache``: per-request offsets, left padding and masks) and brings it
to the step's membership before computing: requests that left are filtered out, requests that join
bring their own prefilled caches, merged in once. A stage whose cache kinds have no batch form
(e.g. Llama 4's chunked caches) runs the same step one request at a time on each request's own
caches: the protocol is the same, only the speed differs.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache

# Per-request cache kinds that merge into a batch cache (and the batch kinds filter and extend).
_BATCHABLE = (KVCache, RotatingKVCache)


def can_batch(caches: list) -> bool:
    """Whether every cache of a stage's fresh per-request set has a batch form."""
    return all(type(cache) in _BATCHABLE and not getattr(cache, "keep", 0) for cache in caches)


def prefill_caches(prototypes: list, left_padding: list[int]) -> list:
    """Empty batch caches for prompts prefilled together, left-padded by ``left_padding``: one per
    layer, the batch kind of each of ``prototypes`` (a request's fresh caches)."""
    return [
        BatchRotatingKVCache(cache.max_size, left_padding)
        if isinstance(cache, RotatingKVCache)
        else BatchKVCache(left_padding)
        for cache in prototypes
    ]


class MicroBatch:
    """One micro-batch's requests (in step order) and, on a stage that batches, its batch caches."""

    def __init__(self, batched: bool):
        self.batched = batched
        self.ids: list[str] = []
        self.caches: list | None = None  # one batch cache per local layer, rows in ``ids`` order

    def __len__(self) -> int:
        return len(self.ids)

    def sync(self, ids: list[str], own_caches: Callable[[str], list]) -> None:
        """Make the rows ``ids``, in that order: drop the requests not in it, merge in the new
        ones (``own_caches(id)``: that request's prefilled per-request caches, taken over)."""
        if ids == self.ids:
            return
        wanted = set(ids)
        kept = [i for i, request_id in enumerate(self.ids) if request_id in wanted]
        if len(kept) != len(self.ids):
            self._take(kept)
        joining = [request_id for request_id in ids if request_id not in set(self.ids)]
        if joining:
            self._join(joining, own_caches)
        if self.ids != ids:  # same members, another order: reorder the rows
            position = {request_id: i for i, request_id in enumerate(self.ids)}
            self._take([position[request_id] for request_id in ids])

    def remove(self, request_id: str) -> None:
        if request_id in self.ids:
            self._take([i for i, other in enumerate(self.ids) if other != request_id])

    def _take(self, rows: list[int]) -> None:
        self.ids = [self.ids[i] for i in rows]
        if not self.batched:
            return
        if not rows:
            self.caches = None
        elif self.caches is not None:
            index = mx.array(rows, dtype=mx.int32)
            for cache in self.caches:
                cache.filter(index)

    def _join(self, joining: list[str], own_caches: Callable[[str], list]) -> None:
        self.ids = self.ids + joining
        if not self.batched:
            return
        per_request = [own_caches(request_id) for request_id in joining]
        merged = [type(layer[0]).merge(list(layer)) for layer in zip(*per_request)]
        if self.caches is None:
            self.caches = merged
        else:
            for cache, new in zip(self.caches, merged):
                cache.extend(new)
