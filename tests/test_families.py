"""Families without an adapter of their own: mlx-lm's common shape is enough for pipeline and
expert parallelism. Each family's tiny checkpoint runs as a chain of in-process stages and on real
clusters of 2 and 3 stages (MoE families with experts on other nodes): greedy tokens identical to
single-process mlx-lm."""

from __future__ import annotations

import numpy as np
import pytest
from cluster_helpers import running_cluster
from layouts import PROMPT
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from tiny_models import (
    EXTRA_FAMILIES,
    EXTRA_MOE_FAMILIES,
    chain_generate,
    make_tiny_checkpoint,
    reference_generate,
    reference_logits,
)

from pomona.errors import ModelError
from pomona.modelinfo import describe_model
from pomona.tokenizer import load_tokenizer
from worker.families import EXCEPTIONS, StageAdapter, adapter_for
from worker.stage import load_stage

NEW_TOKENS = 8
# Every extra family has 4 layers. gemma3_text, mistral and gpt_oss alternate sliding-window and
# full attention, so these cuts leave stages with one kind only and stages with both.
LAYOUTS = {2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_checkpoint(family, root / family) for family in EXTRA_FAMILIES}


@pytest.fixture(scope="module")
def references(checkpoints):
    """family -> (prompt ids, greedy tokens of single-process mlx-lm)."""
    made = {}
    for family, path in checkpoints.items():
        prompt = load_tokenizer(path).encode(PROMPT)
        made[family] = prompt, reference_generate(path, prompt, NEW_TOKENS)
    return made


@pytest.mark.parametrize("family", EXTRA_FAMILIES)
def test_family_uses_the_generic_adapter(checkpoints, family):
    model, _ = load_model(checkpoints[family], lazy=True)
    adapter = adapter_for(model, family)
    assert family not in EXCEPTIONS and type(adapter) is StageAdapter
    info = describe_model(str(checkpoints[family]))
    assert adapter.num_layers == info.num_layers
    # The worker finds the experts by structure where the coordinator finds expert tensors.
    moe = tuple(i for i in range(adapter.num_layers) if adapter.expert_module_path(i))
    assert moe == info.moe_layers
    assert bool(moe) == (family in EXTRA_MOE_FAMILIES)


@pytest.mark.parametrize("stage_count", [2, 3])
@pytest.mark.parametrize("family", EXTRA_FAMILIES)
def test_stage_chain_matches_mlx_lm(checkpoints, references, family, stage_count):
    prompt, expected = references[family]
    logits, tokens = chain_generate(checkpoints[family], LAYOUTS[stage_count], prompt, NEW_TOKENS)
    np.testing.assert_allclose(logits, reference_logits(checkpoints[family], prompt), atol=1e-4)
    assert tokens == expected
    assert len(set(expected)) >= 3  # a degenerate model would prove little


def _expert_layout(family: str, stage_count: int, info):
    """Experts on other nodes: a third, expert-only node beside 2 stages; with 3 stages, the last
    stage's node also holds experts of the first MoE layer, which another stage runs."""
    if family not in EXTRA_MOE_FAMILIES:
        return stage_count, None
    half, first = info.num_experts // 2, info.moe_layers[0]
    if stage_count == 2:
        return 3, [{"node": "c", "layers": [0, 4], "experts": [0, half]}]
    return 3, [{"node": "c", "layers": [first, first + 1], "experts": [half, info.num_experts]}]


@pytest.mark.parametrize("stage_count", [2, 3])
@pytest.mark.parametrize("family", EXTRA_FAMILIES)
def test_cluster_matches_mlx_lm(checkpoints, references, tmp_path, family, stage_count):
    path = checkpoints[family]
    prompt, expected = references[family]
    nodes, experts = _expert_layout(family, stage_count, describe_model(str(path)))
    with running_cluster(tmp_path, path, nodes, LAYOUTS[stage_count], experts) as cluster:
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert summary.prompt_tokens == len(prompt)
        assert list(summary.token_ids) == expected
        if experts is not None:
            stats = cluster.expert_stats()
            assert any(n.node == "c" and n.stats.layers for n in stats.nodes), "c computed nothing"


def test_glm4_moe_lite_needs_array_masks_and_gets_them(tmp_path):
    """An exception of the generic adapter (MLA attention, as DeepSeek-V3): stage chains of 2 and 3
    stages still give mlx-lm's tokens."""
    path = make_tiny_checkpoint("glm4_moe_lite", tmp_path / "glm4_moe_lite")
    model, _ = load_model(path, lazy=True)
    assert type(adapter_for(model, "glm4_moe_lite")) is EXCEPTIONS["glm4_moe_lite"]
    prompt = load_tokenizer(path).encode(PROMPT)
    expected = reference_generate(path, prompt, NEW_TOKENS)
    for layout in LAYOUTS.values():
        assert chain_generate(path, layout, prompt, NEW_TOKENS)[1] == expected


def test_family_code_that_cannot_embed_alone_fails_at_load(tmp_path):
    """Llama 4's backbone trims its chunked caches in its own __call__: run without them, the
    generic adapter's embedding fails, at load and with a message; hence its own adapter."""
    model, _ = load_model(make_tiny_checkpoint("llama4", tmp_path / "llama4"), lazy=True)
    with pytest.raises(ModelError, match="llama4: the family's own code cannot run the embedding"):
        StageAdapter(model, "llama4").check_ends(is_first=True, is_last=False)
    adapter_for(model, "llama4").check_ends(is_first=True, is_last=True)


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "gpt_oss", "granitemoe"])
def test_each_stage_holds_exactly_its_shard(checkpoints, family):
    """Layers by index, the embedding on the first stage (and the last, when tied), norm and head
    on the last: nothing else is kept (tied qwen2, gemma3's head, gpt_oss's sinks and biases)."""
    full, _ = load_model(checkpoints[family], lazy=True)
    names = {name for name, _ in tree_flatten(full.parameters())}
    tied = adapter_for(full, family).tied_embeddings
    layout = LAYOUTS[3]
    for index, (start, end) in enumerate(layout):
        first, last = index == 0, index == len(layout) - 1
        stage = load_stage(checkpoints[family], start, end, first, last)
        expected = set()
        for name in names:
            parts = name.split(".")
            if "layers" in parts:
                keep = start <= int(parts[parts.index("layers") + 1]) < end
            elif "embed_tokens" in parts:
                keep = first or (last and tied)
            else:  # final norm, lm_head
                keep = last
            if keep:
                expected.add(name)
        assert stage.parameter_names() == expected, f"stage {index}"
