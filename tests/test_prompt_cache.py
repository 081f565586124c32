"""The prompt cache: a finished request's caches are kept at every stage, and a later prompt that
starts with the same tokens skips their prefill; its greedy tokens stay single-process mlx-lm's.
Stage 0's bookkeeping (which entry, how many tokens, what to evict) is tested as a table."""

from __future__ import annotations

import queue

import mlx.core as mx
import pytest
from cluster_helpers import running_cluster
from http_helpers import api_url, post_json
from layouts import LAYOUTS
from mlx_lm.models.cache import KVCache, RotatingKVCache
from tiny_models import make_tiny_checkpoint, reference_generate

from pomona.proto import worker_pb2
from pomona.tokenizer import load_tokenizer
from worker.engine import StageEngine
from worker.link import Link
from worker.prompt_cache import KeptCaches, PromptIndex, keepable
from worker.stage import load_stage

PROMPT = "A prompt cache keeps the keys and values of a finished request for the next one"


@pytest.mark.parametrize(
    ("entries", "prompt", "expected"),
    [
        ({}, [1, 2, 3], ("", 0)),
        ({"a": (1, 2, 3, 4)}, [1, 2, 3, 4, 5], ("a", 4)),  # the whole entry, then one new token
        ({"a": (1, 2, 3, 4)}, [1, 2, 3, 4], ("a", 3)),  # the same prompt: all but its last token
        ({"a": (1, 2, 3, 4)}, [1, 2, 9, 4, 5], ("a", 2)),  # a shared prefix of an entry
        ({"a": (9, 9)}, [1, 2], ("", 0)),  # nothing shared
        ({"a": (1, 2), "b": (1, 2, 3, 4, 5)}, [1, 2, 3, 4, 7], ("b", 4)),  # the longest wins
        ({"a": (1, 2, 3)}, [1], ("", 0)),  # a one-token prompt has nothing to prefill
    ],
)
def test_lookup_reuses_the_longest_shared_prefix_but_the_last_prompt_token(entries, prompt, expected):
    index = PromptIndex(budget_tokens=100)
    for entry, tokens in entries.items():
        index.add(entry, list(tokens))
    assert index.lookup(prompt) == expected


def test_entries_beyond_the_budget_are_evicted_least_recently_used_first():
    index = PromptIndex(budget_tokens=10)
    index.add("a", [1] * 4)
    index.add("b", [2] * 4)
    assert index.lookup([1, 1, 1, 1, 5]) == ("a", 4)  # "a" is now the most recently used
    index.add("c", [3] * 4)  # 12 tokens: "b" goes
    assert list(index.entries) == ["a", "c"] and index.take_evicted() == ["b"]
    assert index.take_evicted() == []  # told once
    index.add("d", [4] * 11)  # over the budget alone: everything goes, itself too
    assert index.entries == {} and index.take_evicted() == ["a", "c", "d"]


def test_a_reused_entry_is_copied_not_shared():
    kept = KeptCaches()
    cache = KVCache()
    cache.update_and_fetch(mx.ones((1, 2, 5, 4)), mx.ones((1, 2, 5, 4)))
    assert kept.keep("a", [cache]) == 5
    (copy,) = kept.reuse("a", 3)
    assert copy.offset == 3
    keys, _ = copy.update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 4)))  # grows
    assert keys.shape[2] == 4 and keys[0, 0, 3].sum().item() == 0
    kept_keys = kept.entries["a"][0].keys
    assert kept.entries["a"][0].offset == 5 and kept_keys[..., :5, :].sum().item() == 2 * 5 * 4
    with pytest.raises(LookupError, match="only 5 tokens"):
        kept.reuse("a", 6)
    with pytest.raises(LookupError, match="not here"):
        kept.reuse("b", 1)
    assert not keepable([RotatingKVCache(8)]) and not keepable([]) and keepable([KVCache()])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("prompt-cache") / "llama")


def test_a_prompt_that_extends_a_finished_one_skips_its_prefill_on_three_stages(tmp_path, model_dir):
    """The same prompt again reuses all but its last token; the next turn (the prompt, the
    answer, more text) reuses what the first request's caches hold; both give mlx-lm's tokens."""
    tokenizer = load_tokenizer(model_dir)
    with running_cluster(tmp_path, model_dir, 3, LAYOUTS["llama"][3]) as cluster:
        first = cluster.generate(PROMPT, raw=True, max_tokens=8)
        assert first.cached_prompt_tokens == 0
        again = cluster.generate(PROMPT, raw=True, max_tokens=8)
        assert again.cached_prompt_tokens == first.prompt_tokens - 1
        assert list(again.token_ids) == list(first.token_ids)

        follow_up = PROMPT + first.text + " and then some more words"
        ids = tokenizer.encode(follow_up)
        turn = cluster.generate(follow_up, raw=True, max_tokens=8)
        assert turn.prompt_tokens == len(ids)
        # at least the first prompt is shared; at most what the first request's caches hold
        assert first.prompt_tokens - 1 <= turn.cached_prompt_tokens <= first.prompt_tokens + 7
        assert list(turn.token_ids) == reference_generate(model_dir, ids, 8)

        status, _, body = post_json(
            f"{api_url(tmp_path)}/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        )
        assert status == 200, body
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == first.prompt_tokens - 1
        assert all(stage.prompt_cache_bytes > 0 for stage in cluster.status().stages)


def test_the_budget_evicts_old_entries_and_zero_turns_the_cache_off(tmp_path, model_dir):
    one, other = PROMPT, "Some other words, sharing not one token with the first of these two"
    tokens = len(load_tokenizer(model_dir).encode(one)) + 8
    # room for one finished request only
    generation = {"prompt_cache_tokens": tokens + 4}
    layout = LAYOUTS["llama"][2]
    with running_cluster(tmp_path / "small", model_dir, 2, layout, generation=generation) as cluster:
        cluster.generate(one, raw=True, max_tokens=8)
        assert cluster.generate(other, raw=True, max_tokens=8).cached_prompt_tokens == 0
        assert cluster.generate(one, raw=True, max_tokens=8).cached_prompt_tokens == 0  # evicted
        before = cluster.status().stages[0].prompt_cache_bytes  # one entry of `one`
        assert cluster.generate(one, raw=True, max_tokens=8).cached_prompt_tokens > 0
        first, second = (stage.prompt_cache_bytes for stage in cluster.status().stages)
        assert first == before  # stage 0 keeps one entry
        # The second stage (twice the layers) drops what stage 0 evicts with the next start: it
        # holds the new entry and the one evicted last, not every entry so far.
        assert second == 2 * 2 * first
    with running_cluster(
        tmp_path / "off", model_dir, 2, LAYOUTS["llama"][2], generation={"prompt_cache_tokens": 0}
    ) as cluster:
        cluster.generate(one, raw=True, max_tokens=8)
        assert cluster.generate(one, raw=True, max_tokens=8).cached_prompt_tokens == 0
        assert all(stage.prompt_cache_bytes == 0 for stage in cluster.status().stages)


class _EngineLink(Link):
    """An in-process link: each message reaches the other engine as a copy, as over the wire."""

    def __init__(self, node: str, engine: StageEngine):
        self.node, self.address, self.engine = node, "in-process", engine

    def send(self, message) -> None:
        self.engine.submit(type(message).FromString(message.SerializeToString()))

    @property
    def broken(self) -> str:
        return ""

    def close(self) -> None:
        pass


def _run(first: StageEngine, events: queue.SimpleQueue, request_id: str, prompt: list[int]) -> list:
    first.claim(request_id)
    start = worker_pb2.StartRequest(prompt_token_ids=prompt, max_tokens=4, prefill_chunk_tokens=8)
    first.submit(worker_pb2.StageMessage(request_id=request_id, start=start))
    got = []
    while not (got and got[-1].finish_reason):
        got += [event for event in events.get(timeout=60) if event.request_id == request_id]
        assert not got[-1].error, got[-1].error
    return got


def test_entries_stage_0_does_not_know_or_may_have_lost_are_dropped_everywhere(model_dir):
    """Two in-process stages. A finished request's caches are kept at both; an entry that only a
    later stage holds (its request ended here before the last stage finished it) is dropped there
    with the next start; a broken next-stage link drops every entry (the ends in flight may not
    have reached every stage)."""
    first, last = StageEngine(), StageEngine()
    stages = [load_stage(model_dir, 0, 2, True, False), load_stage(model_dir, 2, 6, False, True)]
    first.call(lambda: first.install(stages[0], 0, 2, _EngineLink("b", last), 0, 1000)).result(60)
    last.call(lambda: last.install(stages[1], 1, 2, _EngineLink("a", first), 0, 1000)).result(60)
    events = last.results.subscribe()
    prompt = list(range(3, 20))
    assert _run(first, events, "r1", prompt)[0].cached_prompt_tokens == 0
    # (read on the engines' threads: after the messages already queued there)
    assert "r1" in first.call(lambda: dict(first.prompt_cache.index.entries)).result(10)
    assert "r1" in last.call(lambda: dict(last.prompt_cache.kept.entries)).result(10)
    ghost = last.call(lambda: last.prompt_cache.kept.reuse("r1", 5)).result(10)
    last.call(lambda: last.prompt_cache.kept.keep("ghost", ghost)).result(10)
    end = worker_pb2.EndRequest(origin=1, finished=True)  # the last stage finished "ghost"
    first.submit(worker_pb2.StageMessage(request_id="ghost", end=end))
    assert _run(first, events, "r2", prompt)[0].cached_prompt_tokens == len(prompt) - 1
    assert set(last.call(lambda: dict(last.prompt_cache.kept.entries)).result(10)) == {"r1", "r2"}

    first.call(lambda: first.on_next_link_broken("next stage 'b' is unreachable")).result(10)
    cache = first.prompt_cache
    assert first.call(lambda: (dict(cache.index.entries), cache.kept.entries)).result(10) == ({}, {})
    assert _run(first, events, "r3", prompt)[0].cached_prompt_tokens == 0
    assert set(last.call(lambda: dict(last.prompt_cache.kept.entries)).result(10)) == {"r3"}
    for engine in (first, last):
        engine.call(engine.release).result(10)
