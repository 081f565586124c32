"""The prompt cache: the caches of finished requests, kept so that a later prompt that starts with
the same tokens (the next turn of a chat, a shared system prompt) skips their prefill.

Stage 0 decides everything (``PromptIndex``, pure bookkeeping): which kept entry a new prompt
reuses and how many of its tokens, and which entries go when the cache is over its token budget.
Its decisions travel in the request's ``start`` on the ring, so every stage applies them in the
same order: drop the evicted entries, then copy the reused entry's first tokens as the new
request's caches (``KeptCaches``). Stage 0 drops what it evicts at once; the other stages hold it
until the next start tells them (one finished request's worth at most beyond the budget). A
request that finishes normally (EOS or its max tokens) is kept under its request id at every
stage when its ``end`` passes; stage 0 then indexes it by the tokens its caches hold (the
prompt, then every generated token but the last, which was sampled and never fed back).

Only plain attention caches (mlx-lm's ``KVCache``) are kept: a sliding-window or chunked cache
has dropped the tokens that a prefix would need. Stage 0 enables the cache only when every layer
of the model keeps that kind.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
from mlx_lm.models.cache import KVCache


def keepable(caches: list) -> bool:
    """Whether a set of caches (a request's, or a model's prototypes) can be kept and reused."""
    return bool(caches) and all(type(cache) is KVCache for cache in caches)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


class PromptIndex:
    """Stage 0's view of the kept entries: each one's tokens, least recently used first, within a
    budget of ``budget_tokens`` in all."""

    def __init__(self, budget_tokens: int):
        self.budget_tokens = budget_tokens
        self.entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._evicted: list[str] = []  # dropped here; the other stages drop them with the next start

    @property
    def tokens(self) -> int:
        return sum(len(tokens) for tokens in self.entries.values())

    def lookup(self, prompt: list[int]) -> tuple[str, int]:
        """The entry sharing the longest prefix with ``prompt`` and how many tokens of it to reuse
        (all but the prompt's last token at most: that one goes in the first decode step);
        ("", 0) when none shares a token."""
        best, best_count = "", 0
        for entry, tokens in self.entries.items():
            count = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if count > best_count:
                best, best_count = entry, count
        if best:
            self.entries.move_to_end(best)  # recently used: evicted last
        return best, best_count

    def add(self, entry: str, tokens: list[int]) -> None:
        """A finished request's caches, holding ``tokens``, are kept at every stage; evict the
        least recently used entries (this one too, if it alone is over the budget) to fit."""
        self.entries[entry] = tuple(tokens)
        while self.entries and self.tokens > self.budget_tokens:
            self.evict(next(iter(self.entries)))

    def evict(self, entry: str) -> None:
        """Drop ``entry`` here and tell the other stages (with the next start)."""
        self.entries.pop(entry, None)
        self._evicted.append(entry)

    @property
    def evicted(self) -> list[str]:
        """Evicted here, not yet told to the other stages."""
        return list(self._evicted)

    def take_evicted(self) -> list[str]:
        evicted, self._evicted = self._evicted, []
        return evicted


class KeptCaches:
    """One stage's kept entries: entry id -> that request's caches of this stage's layers."""

    def __init__(self) -> None:
        self.entries: dict[str, list[KVCache]] = {}

    def keep(self, entry: str, caches: list) -> int:
        """Keep ``caches`` (evaluated now, so nothing else stays alive through them); the number
        of tokens they hold."""
        mx.eval([(cache.keys, cache.values) for cache in caches])
        self.entries[entry] = caches
        return caches[0].offset

    def holds(self, entry: str, tokens: int) -> bool:
        """Whether ``entry`` is kept here with at least ``tokens`` positions."""
        kept = self.entries.get(entry)
        return kept is not None and kept[0].offset >= tokens

    def reuse(self, entry: str, tokens: int) -> list[KVCache]:
        """New caches holding the first ``tokens`` positions of ``entry`` (the entry stays as it
        is: the new caches hold slices, and grow into arrays of their own)."""
        if not self.holds(entry, tokens):
            kept = self.entries.get(entry)
            held = "not here" if kept is None else f"only {kept[0].offset} tokens here"
            raise LookupError(f"prompt cache entry {entry!r} for {tokens} tokens is {held}")
        copies = []
        for cache in self.entries[entry]:
            copy = KVCache()
            copy.keys = cache.keys[..., :tokens, :]
            copy.values = cache.values[..., :tokens, :]
            copy.offset = tokens
            copies.append(copy)
        return copies

    def drop(self, entries) -> None:
        for entry in entries:
            self.entries.pop(entry, None)

    def clear(self) -> None:
        self.entries.clear()

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for caches in self.entries.values() for cache in caches)


class StagePromptCache:
    """One stage's part of the prompt cache: its kept entries and, on stage 0, the index that
    decides for every stage."""

    def __init__(self) -> None:
        self.kept = KeptCaches()
        self.index: PromptIndex | None = None

    def reset(self, budget_tokens: int = 0, model_caches: list | None = None) -> None:
        """Forget every entry. Given a budget and the model's caches (stage 0), decide from now on
        if every layer of the model keeps a cache that can be kept."""
        self.kept.clear()
        deciding = budget_tokens > 0 and model_caches is not None and keepable(model_caches)
        self.index = PromptIndex(budget_tokens) if deciding else None

    def plan(self, start, prompt: list[int]) -> None:
        """Stage 0: what a new request takes from the cache and what the stages drop first,
        written into its ``start`` (what arrived in those fields is not the coordinator's to say)."""
        del start.evict[:]
        start.reuse_entry, start.reuse_tokens, start.keep = "", 0, False
        if self.index is None:
            return
        entry, count = self.index.lookup(prompt)
        if entry and not self.kept.holds(entry, count):  # not what the index says: drop it
            self.index.evict(entry)
            entry, count = "", 0
        start.evict.extend(self.index.take_evicted())
        start.reuse_entry, start.reuse_tokens, start.keep = entry, count, True

    def apply(self, start) -> list | None:
        """Every stage, as a request starts: drop the evicted entries; the reused entry's first
        tokens as new caches (None: the request starts empty). LookupError: not kept here."""
        self.kept.drop(start.evict)
        return self.kept.reuse(start.reuse_entry, start.reuse_tokens) if start.reuse_entry else None

    def finished(self, entry: str, caches: list | None, tokens: list[int] | None) -> None:
        """A request that asked to be kept finished: keep ``caches`` (this stage's; None: none
        here to keep). Stage 0 indexes them by the first of ``tokens`` they hold (the prompt and
        the generated tokens fed back; None: the request is unknown here), or has every stage
        drop the entry (e.g. a request cancelled here while the last stage finished it)."""
        held = self.kept.keep(entry, caches) if caches and keepable(caches) else 0
        if self.index is None:
            return
        if held and tokens is not None and len(tokens) >= held:
            self.index.add(entry, tokens[:held])
        else:
            self.index.evict(entry)
        self.kept.drop(self.index.evicted)  # here now; the other stages with the next start

    def forget_all(self) -> None:
        """Stage 0, when its next stage's link broke: ends in flight may not have reached every
        stage, so every entry goes (here now, elsewhere with the next start)."""
        if self.index is not None:
            for entry in list(self.index.entries):
                self.index.evict(entry)
            self.kept.drop(self.index.evicted)

    @property
    def nbytes(self) -> int:
        return self.kept.nbytes
