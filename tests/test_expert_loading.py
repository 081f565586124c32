"""A node loads only the routed experts it owns: the stacked expert tensors sliced along the expert
axis (with the scales and biases of quantized checkpoints), nothing else."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from tiny_models import make_tiny_checkpoint

from worker.experts import DistributedSwitchGLU, ExpertStats
from worker.families import adapter_for
from worker.families.base import child, expert_count
from worker.stage import ExpertPlan, load_expert_host, load_stage


@pytest.fixture(scope="module", params=["mixtral-q4", "qwen3_moe", "llama4", "deepseek_v3"])
def checkpoint(request, tmp_path_factory):
    family, _, quantized = request.param.partition("-")
    bits = 4 if quantized else None
    path = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family) / family, quantize_bits=bits)
    full, _ = load_model(path)
    return family, path, full


def _moe_layers(family, full):
    adapter = adapter_for(full, family)
    return [
        layer for layer in range(adapter.num_layers)
        if adapter.expert_module_path(layer) is not None
    ]


def _params(module) -> dict[str, mx.array]:
    return dict(tree_flatten(module.parameters()))


def test_expert_host_holds_exactly_its_slices(checkpoint):
    family, path, full = checkpoint
    adapter = adapter_for(full, family)
    first, last = _moe_layers(family, full)[0], _moe_layers(family, full)[-1]
    groups = {first: [1, 3], last: [0]}
    host = load_expert_host(path, groups, ExpertStats())
    assert set(host.modules) == set(groups)
    for layer, ids in groups.items():
        module, local_index = host.modules[layer]
        reference = _params(child(full, adapter.expert_module_path(layer)))
        held = _params(module)
        assert held.keys() == reference.keys()
        if family == "mixtral":
            assert any(name.endswith("scales") for name in held)  # quantized slices too
        for name, array in held.items():
            assert array.shape[0] == len(ids)
            np.testing.assert_array_equal(np.array(array), np.array(reference[name][mx.array(ids)]))
        assert [int(local_index[i]) for i in ids] == list(range(len(ids)))


def test_stage_keeps_only_its_local_experts(checkpoint):
    family, path, full = checkpoint
    adapter = adapter_for(full, family)
    layers = _moe_layers(family, full)
    split = layers[0]
    num_experts = expert_count(child(full, adapter.expert_module_path(split)))
    plan = ExpertPlan(
        held={split: [0]}, remote={split: {"b": list(range(1, num_experts))}}, dispatcher=None
    )
    stage = load_stage(path, 0, adapter.num_layers, True, True, experts=plan)
    module = child(stage.model, adapter.expert_module_path(split))
    assert isinstance(module, DistributedSwitchGLU)
    reference = _params(child(full, adapter.expert_module_path(split)))
    local = _params(module.local)
    assert local.keys() == reference.keys()
    for name, array in local.items():
        np.testing.assert_array_equal(np.array(array), np.array(reference[name][:1]))
    # Other MoE layers keep every expert, as mlx-lm's own module.
    for layer in layers[1:]:
        assert not isinstance(child(stage.model, adapter.expert_module_path(layer)), DistributedSwitchGLU)
