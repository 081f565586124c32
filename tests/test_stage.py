"""In-process checks of the stage split: a chain of ``StageModel``s equals the whole mlx-lm model
(logits allclose, greedy tokens identical), and each stage holds exactly its shard."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from layouts import LAYOUTS, PROMPT
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from tiny_models import FAMILIES, reference_generate, reference_logits

from pomona.tokenizer import load_tokenizer
from worker.stage import load_stage


def _chain(path, layout):
    last = len(layout) - 1
    return [load_stage(path, s, e, i == 0, i == last) for i, (s, e) in enumerate(layout)]


def _run(stages, caches, ids):
    hidden = mx.array([ids], dtype=mx.int32)
    for stage, stage_caches in zip(stages, caches):
        hidden = stage.forward(hidden, stage_caches)
    return stages[-1].logits(hidden)


CASES = [(f, n) for f in FAMILIES for n in (2, 3)] + [("mixtral-q4", 2), ("llama-bf16", 3)]


@pytest.mark.parametrize("name,stage_count", CASES)
def test_stage_chain_equals_whole_model(family_checkpoints, name, stage_count):
    path = family_checkpoints[name]
    layout = LAYOUTS[name.split("-")[0]][stage_count]
    prompt = load_tokenizer(path).encode(PROMPT)
    assert len(prompt) > 8  # crosses llama4's attention chunk

    stages = _chain(path, layout)
    caches = [stage.new_caches() for stage in stages]
    logits = _run(stages, caches, prompt)
    expected = reference_logits(path, prompt)
    tolerance = 2e-2 if "bf16" in name else 1e-4
    np.testing.assert_allclose(np.array(logits.astype(mx.float32)), expected, atol=tolerance)

    # Greedy decoding through the chain, one token at a time, as the pipeline does it.
    tokens = [int(mx.argmax(logits).item())]
    for _ in range(11):
        tokens.append(int(mx.argmax(_run(stages, caches, [tokens[-1]])).item()))
    assert tokens == reference_generate(path, prompt, 12)


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_holds_exactly_its_shard(family_checkpoints, family):
    path = family_checkpoints[family]
    full, _ = load_model(path, lazy=True)
    all_names = {name for name, _ in tree_flatten(full.parameters())}
    layout = LAYOUTS[family][3]
    for index, (start, end) in enumerate(layout):
        stage = load_stage(path, start, end, index == 0, index == len(layout) - 1)
        names = stage.parameter_names()
        expected = set()
        for name in all_names:
            layer = _layer_of(name)
            if layer is not None:
                keep = start <= layer < end
            elif "embed_tokens" in name:
                keep = stage.is_first or (stage.is_last and stage.adapter.tied_embeddings)
            else:  # final norm, lm_head
                keep = stage.is_last
            if keep:
                expected.add(name)
        assert names == expected, f"stage {index} of {family}"
        held = sum(v.nbytes for _, v in tree_flatten(stage.model.parameters()))
        assert held == stage.parameter_bytes


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None
