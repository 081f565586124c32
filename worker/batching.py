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
from dataclasses import dataclass, field

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
        present = set(self.ids)
        joining = [request_id for request_id in ids if request_id not in present]
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


DEFAULT_MAX_BATCH = 32  # requests per decode micro-batch when the start message names none


@dataclass
class BatchSlot:
    """Stage 0's view of one decode micro-batch."""

    members: list[str] = field(default_factory=list)  # decoding, in step order
    joining: list[str] = field(default_factory=list)  # prefilled, waiting for the next step
    in_flight: list[str] = field(default_factory=list)  # rows of the step on the ring (empty: idle)
    step: int = 0


class DecodeScheduler:
    """Stage 0's decode micro-batches: which requests decode together and when each step starts
    (bookkeeping only; the engine computes). A micro-batch's next step starts when its last
    step's tokens are back, with the requests that go on and those that joined meanwhile, up to
    ``max_batch``; a request joins the micro-batch with the fewest requests."""

    def __init__(self, count: int, max_batch: int = DEFAULT_MAX_BATCH):
        self.slots = [BatchSlot() for _ in range(count)]
        self.max_batch = max_batch

    def join(self, request_id: str) -> int:
        """A prefilled request waits for the next step of the smallest micro-batch (its index)."""
        sizes = [len(slot.members) + len(slot.joining) for slot in self.slots]
        index = sizes.index(min(sizes))
        self.slots[index].joining.append(request_id)
        return index

    def forget(self, request_id: str, index: int) -> None:
        """The request ended: it leaves its micro-batch (a step whose rows all ended is over)."""
        slot = self.slots[index]
        for rows in (slot.members, slot.joining, slot.in_flight):
            if request_id in rows:
                rows.remove(request_id)

    def idle(self) -> list[int]:
        """Micro-batches with requests and no step on the ring: each can start its next step."""
        waiting = [i for i, slot in enumerate(self.slots) if slot.members or slot.joining]
        return [i for i in waiting if not self.slots[i].in_flight]

    def rows(self, index: int) -> list[str]:
        slot = self.slots[index]
        return [*slot.members, *slot.joining]

    def start(self, index: int) -> tuple[int, list[str]] | None:
        """Admit joiners (up to ``max_batch`` rows) and start a step: its number and rows."""
        slot = self.slots[index]
        room = max(0, self.max_batch - len(slot.members))
        slot.members += slot.joining[:room]
        del slot.joining[:room]
        if not slot.members:
            return None
        slot.step += 1
        slot.in_flight = list(slot.members)
        return slot.step, list(slot.members)

    def tokens_back(self, index: int, step: int, going: list[str]) -> bool:
        """A step's tokens came back with the rows ``going`` on (the others ended); False for a
        step that is no longer on the ring (its rows all ended, and its micro-batch went on)."""
        slot = self.slots[index]
        if step != slot.step or not slot.in_flight:
            return False
        slot.in_flight = []
        slot.members = list(going)
        return True

    def clear(self) -> None:
        self.slots = [BatchSlot() for _ in self.slots]
