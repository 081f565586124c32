"""Continuous batching: concurrent requests decode together, one batched forward per stage and step,
joining and leaving between steps, and each request's tokens are those it gets alone (greedy and
seeded sampling), which for greedy are single-process mlx-lm's."""

from __future__ import annotations

import concurrent.futures
import json

import mlx.core as mx
import pytest
from cluster_helpers import running_cluster
from layouts import LAYOUTS, PROMPT
from tiny_models import make_tiny_checkpoint, reference_generate

from coordinator.load_request import micro_batch_count
from pomona.tokenizer import load_tokenizer
from worker.batching import DecodeScheduler, MicroBatch, can_batch, prefill_caches
from worker.stage import load_stage

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30], [40 + i for i in range(13)]]


def _alone(stages, prompt: list[int], count: int) -> list[int]:
    caches = [stage.new_caches() for stage in stages]

    def run(ids: list[int]) -> mx.array:
        hidden = mx.array([ids], dtype=mx.int32)
        for stage, stage_caches in zip(stages, caches):
            hidden = stage.forward(hidden, stage_caches)
        return hidden

    if len(prompt) > 1:
        mx.eval(run(prompt[:-1]))
    tokens, token = [], prompt[-1]
    for _ in range(count):
        token = int(mx.argmax(stages[-1].logits(run([token]))).item())
        tokens.append(token)
    return tokens


def _prefill_together(stages, prompts: list[list[int]]) -> list[list[list]]:
    """The prompts (but their last tokens) left-padded through the stages in one forward each, as
    the engine prefills new requests together; each request's own caches per stage."""
    rows = [p[:-1] for p in prompts]
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    hidden = mx.array([[0] * pad + r for pad, r in zip(padding, rows)], dtype=mx.int32)
    own = [[] for _ in prompts]
    for stage in stages:
        caches = prefill_caches(stage.new_caches(), padding)
        hidden = stage.forward(hidden, caches)
        mx.eval(hidden)
        for i in range(len(prompts)):
            own[i].append([cache.extract(i) for cache in caches])
    return own


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mixtral"])
def test_micro_batch_rows_join_leave_and_reorder_and_equal_each_request_alone(family, tmp_path):
    """Two chained stages, each with its own micro-batch caches: three prompts are prefilled
    together (left-padded; the sliding-window family's longest past its window), another request
    joins later, they leave at different lengths, and the rows are reordered once; every request's
    greedy tokens equal its tokens alone."""
    path = make_tiny_checkpoint(family, tmp_path / family)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    cut = layers // 2
    stages = [load_stage(path, 0, cut, True, False), load_stage(path, cut, layers, False, True)]
    assert all(can_batch(stage.new_caches()) for stage in stages)
    lengths = [12, 5, 9, 14]
    expected = [_alone(stages, p, n) for p, n in zip(PROMPTS, lengths)]

    own: dict[str, list[list]] = {}  # request -> its own caches on each stage, until it joins
    batches = [MicroBatch(True) for _ in stages]
    got: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    inputs: dict[str, int] = {}
    widest, step = 0, 0
    while any(len(got[r]) < lengths[int(r)] for r in got):
        if step == 0:  # requests 0, 1 and 3 join at once, prefilled together
            together = [0, 1, 3]
            for i, caches in zip(together, _prefill_together(stages, [PROMPTS[i] for i in together])):
                own[str(i)], inputs[str(i)] = caches, PROMPTS[i][-1]
        if step == 4:  # request 2 (one prompt token: nothing to prefill) joins later
            own["2"], inputs["2"] = [stage.new_caches() for stage in stages], PROMPTS[2][-1]
        rows = [r for r in own if len(got[r]) < lengths[int(r)]]
        if step == 6:
            rows.reverse()  # the same members in another order
        hidden = mx.array([[inputs[r]] for r in rows], dtype=mx.int32)
        for index, (stage, batch) in enumerate(zip(stages, batches)):
            batch.sync(rows, lambda r, index=index: own[r][index])
            assert batch.ids == rows
            hidden = stage.forward(hidden, batch.caches)
        widest = max(widest, len(rows))
        tokens = mx.argmax(stages[-1].row_logits(hidden), axis=-1).tolist()
        for request, token in zip(rows, tokens):
            got[request].append(token)
            inputs[request] = token
        step += 1
    assert widest == len(PROMPTS)  # every request decoded in one forward at some step
    assert [got[str(i)] for i in range(len(PROMPTS))] == expected
    assert all(len(batch) == 0 or batch.caches is not None for batch in batches)


def test_llama4_chunked_caches_have_no_batch_form(tmp_path):
    """Llama 4's chunked-attention caches cannot merge: such a stage runs a step row by row (the
    cluster test in test_pipeline.py checks its tokens under concurrency)."""
    path = make_tiny_checkpoint("llama4", tmp_path / "llama4")
    layers = json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert not can_batch(load_stage(path, 0, layers, True, True).new_caches())


def test_scheduler_balances_admits_up_to_max_batch_and_drops_stale_tokens():
    scheduler = DecodeScheduler(2, max_batch=2)
    assert [scheduler.join(r) for r in "abcde"] == [0, 1, 0, 1, 0]  # the smallest micro-batch
    assert scheduler.idle() == [0, 1]
    assert scheduler.start(0) == (1, ["a", "c"])  # "e" waits: max_batch 2
    assert scheduler.start(1) == (1, ["b", "d"])
    assert scheduler.idle() == []  # both on the ring
    assert scheduler.join("f") == 1  # micro-batch 1 holds fewer (2 against 3)
    scheduler.forget("c", 0)  # ended at the last stage; its end came ahead of the tokens
    assert not scheduler.tokens_back(0, 7, ["a"])  # not the step on the ring
    assert scheduler.tokens_back(0, 1, ["a"])
    assert scheduler.start(0) == (2, ["a", "e"])  # the joiner takes the freed row
    # Every row of micro-batch 1's step ends: the step is over, its late tokens are dropped.
    scheduler.forget("b", 1)
    scheduler.forget("d", 1)
    assert scheduler.idle() == [1]
    assert scheduler.start(1) == (2, ["f"])
    assert not scheduler.tokens_back(1, 1, [])
    assert scheduler.tokens_back(1, 2, ["f"]) and scheduler.rows(1) == ["f"]
    scheduler.forget("f", 1)
    assert scheduler.start(1) is None and scheduler.idle() == []


def test_micro_batches_default_to_one_per_machine():
    assert micro_batch_count(None, ["mac-1", "mac-2", "mac-3"]) == 3
    assert micro_batch_count(None, ["box", "box"]) == 1  # stages sharing a machine share its cores
    assert micro_batch_count(4, ["box", "box"]) == 4  # generation.micro_batches wins


def _batch_counters(cluster) -> dict[str, tuple[int, int]]:
    return {s.node: (s.batch_steps, s.batch_rows) for s in cluster.status().stages if not s.experts_only}


def test_concurrent_requests_share_decode_steps_and_equal_each_alone(tmp_path):
    """Six requests at once on two stages with two micro-batches in flight (greedy and seeded
    sampling, different prompt and output lengths): every stage decodes several per forward, each
    request's tokens equal its tokens alone, and the greedy ones equal mlx-lm's."""
    path = make_tiny_checkpoint("llama", tmp_path / "llama")
    tokenizer = load_tokenizer(path)
    prompts = [PROMPT, PROMPT[:20], PROMPT * 2, "Hello", PROMPT[5:40], "One two three"]
    lengths = [14, 20, 8, 16, 11, 18]
    seeded = [{"temperature": 0.9, "seed": 3}, {"temperature": 1.0, "top_p": 0.9, "seed": 11}]
    sampling = [{}, seeded[0], {}, seeded[1], {}, {}]
    # Two micro-batches in flight (loopback stages share one machine: "auto" would keep one).
    generation = {"micro_batches": 2}
    with running_cluster(tmp_path / "c", path, 2, LAYOUTS["llama"][2], generation=generation) as cluster:

        def run(i: int) -> list[int]:
            summary = cluster.generate(prompts[i], raw=True, max_tokens=lengths[i], **sampling[i])
            return list(summary.token_ids)

        alone = [run(i) for i in range(len(prompts))]
        before = _batch_counters(cluster)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(run, range(len(prompts)), timeout=300))
        after = _batch_counters(cluster)
        assert together == alone
        for i, prompt in enumerate(prompts):
            if not sampling[i]:
                assert together[i] == reference_generate(path, tokenizer.encode(prompt), lengths[i])
        for node, (steps, rows) in after.items():
            steps, rows = steps - before[node][0], rows - before[node][1]
            assert rows == sum(lengths)  # one row per generated token, on every stage
            assert steps < rows, (node, steps, rows)  # requests shared forwards (one each: equal)
        assert cluster.wait_until_idle()


def test_max_batch_bounds_a_micro_batch(tmp_path):
    """generation.max_batch 2 on one stage: five concurrent requests never decode more than two at
    once, and still get their tokens alone."""
    path = make_tiny_checkpoint("qwen3", tmp_path / "qwen3")
    prompts = [f"{PROMPT[:10 + 3 * i]}" for i in range(5)]
    with running_cluster(tmp_path / "c", path, 1, generation={"max_batch": 2}) as cluster:

        def run(prompt: str) -> list[int]:
            return list(cluster.generate(prompt, raw=True, max_tokens=10).token_ids)

        alone = [run(p) for p in prompts]
        before = _batch_counters(cluster)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(run, prompts, timeout=300))
        after = _batch_counters(cluster)
        assert together == alone
        (node,) = after
        steps, rows = after[node][0] - before[node][0], after[node][1] - before[node][1]
        assert rows == 50 and steps >= 25  # at most two rows per step
        assert steps < rows  # and requests shared steps
