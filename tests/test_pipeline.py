"""The oracle for the pipeline: clusters of real worker processes on loopback generate exactly the
greedy tokens of single-process mlx-lm on the same weights."""

from __future__ import annotations

import concurrent.futures

import pytest
from cluster_helpers import cluster_pids, is_running, running_cluster
from layouts import LAYOUTS, PROMPT
from tiny_models import FAMILIES, make_tiny_checkpoint, reference_generate

from pomona.tokenizer import load_tokenizer

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    made = {family: make_tiny_checkpoint(family, root / family) for family in FAMILIES}
    made["llama-q4"] = make_tiny_checkpoint("llama", root / "llama-q4", quantize_bits=4)
    return made


CASES = [(f, n) for f in FAMILIES for n in (2, 3)] + [("llama-q4", 3)]


@pytest.mark.parametrize("name,stage_count", CASES)
def test_cluster_matches_single_process(checkpoints, tmp_path, name, stage_count):
    path = checkpoints[name]
    layout = LAYOUTS[name.split("-")[0]][stage_count]
    prompt_ids = load_tokenizer(path).encode(PROMPT)
    expected = reference_generate(path, prompt_ids, NEW_TOKENS)
    with running_cluster(tmp_path, path, stage_count, layout) as cluster:
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert summary.prompt_tokens == len(prompt_ids)
        assert list(summary.token_ids) == expected
        assert summary.finish_reason == "length"
        # Every stage freed the request's caches.
        assert cluster.wait_until_idle()


def test_concurrent_requests_match_each_alone(checkpoints, tmp_path):
    """Four requests of different lengths at once, each with its own caches, give the tokens each
    gives alone."""
    path = checkpoints["llama4"]
    prompts = [PROMPT, PROMPT[:20], PROMPT * 2, "Hello"]
    lengths = [10, 14, 6, 12]
    with running_cluster(tmp_path, path, 2, LAYOUTS["llama4"][2]) as cluster:
        alone = [
            list(cluster.generate(p, raw=True, max_tokens=n).token_ids)
            for p, n in zip(prompts, lengths)
        ]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(cluster.generate, p, raw=True, max_tokens=n)
                for p, n in zip(prompts, lengths)
            ]
            together = [list(f.result(timeout=300).token_ids) for f in futures]
        assert together == alone
        assert [len(t) for t in together] == lengths


def test_seeded_sampling_is_reproducible(checkpoints, tmp_path):
    path = checkpoints["mixtral"]
    with running_cluster(tmp_path, path, 2, LAYOUTS["mixtral"][2]) as cluster:
        def sample(seed):
            return list(
                cluster.generate(
                    PROMPT, raw=True, max_tokens=16, temperature=1.0, top_p=0.95, top_k=50,
                    min_p=0.01, seed=seed,
                ).token_ids
            )

        first, second, other = sample(7), sample(7), sample(8)
        assert first == second
        assert first != other
        greedy = list(cluster.generate(PROMPT, raw=True, max_tokens=16).token_ids)
        assert first != greedy


def test_stop_string_cancels_and_frees(checkpoints, tmp_path):
    path = checkpoints["llama"]
    prompt_ids = load_tokenizer(path).encode(PROMPT)
    full_text = load_tokenizer(path).decode(reference_generate(path, prompt_ids, 24))
    # A stop string from the middle of the text: printable, and first seen where we cut.
    stop = next(
        window
        for i in range(len(full_text) // 2, len(full_text) - 2)
        if (window := full_text[i : i + 2]).isprintable()
        and not window.isspace()
        and full_text.find(window) > 0
    )
    with running_cluster(tmp_path, path, 2, LAYOUTS["llama"][2]) as cluster:
        summary = cluster.generate(PROMPT, raw=True, max_tokens=24, stop=[stop])
        assert summary.finish_reason == "stop"
        assert summary.text == full_text[: full_text.find(stop)]
        assert len(summary.token_ids) < 24
        # The cancel travels the ring; every stage frees the request.
        assert cluster.wait_until_idle()


def test_no_process_outlives_a_failing_test(checkpoints, tmp_path):
    """`running_cluster` tears everything down even when the test body raises."""
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="test body failed"):
        with running_cluster(tmp_path, checkpoints["llama"], 2, LAYOUTS["llama"][2]):
            seen.extend(cluster_pids(tmp_path))
            raise RuntimeError("test body failed")
    assert len(seen) == 3  # coordinator and two workers were running
    assert not [pid for pid in seen if is_running(pid)]
