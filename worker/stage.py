"""One pipeline stage of a real checkpoint: build the mlx-lm model skeleton, keep only the stage's
layers (plus the embedding on the first stage, the final norm and head on the last), load only the
weights those keep, and run them.

Both checkpoint kinds go through mlx-lm's own model classes: a directory in the layout mlx-lm loads
(weights stay lazy until the shard is evaluated, so the other layers are never read from disk), and a
GGUF file (mapped to mlx-lm names by ``worker.gguf_loader``, which reads only the shard's tensors, each
at its offset). What a stage needs from the model (layers, embedding, norm, head, caches, masks,
expert modules) comes from its adapter (``worker.families``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from pomona.errors import ModelError

from .experts import (
    DistributedSwitchGLU,
    ExpertHost,
    ExpertStats,
    ExpertTable,
    SafetensorsIndex,
    keep_experts,
)
from .families import StageAdapter, adapter_for
from .families.base import child, expert_count

ProgressFn = Callable[[float, str], None]


class StageModel:
    """A loaded shard: layers ``[start, end)`` of ``model`` and the adapter that knows its family."""

    def __init__(
        self,
        model: nn.Module,
        adapter: StageAdapter,
        architecture: str,
        start: int,
        end: int,
        is_first: bool,
        is_last: bool,
    ):
        self.model = model
        self.adapter = adapter
        self.architecture = architecture
        self.start, self.end = start, end
        self.is_first, self.is_last = is_first, is_last
        self.layer_indices = list(range(start, end))
        self.layers = adapter.layers[start:end]

    @property
    def parameter_bytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def parameter_names(self) -> set[str]:
        return {name for name, _ in tree_flatten(self.model.parameters())}

    def new_caches(self) -> list:
        """Fresh per-request caches for this stage's layers, of the kinds mlx-lm's model uses."""
        return [self.adapter.make_cache(i) for i in self.layer_indices]

    def forward(self, inputs: mx.array, caches: list) -> mx.array:
        """Token ids ``[B, L]`` (first stage) or hidden states ``[B, L, D]`` -> hidden ``[B, L, D]``
        (B > 1: a decode micro-batch, ``caches`` its batch caches)."""
        hidden = self.adapter.embed(inputs) if self.is_first else inputs
        masks = self.adapter.masks(hidden, self.layer_indices, caches)
        for layer, cache, mask in zip(self.layers, caches, masks):
            hidden = layer(hidden, mask, cache=cache)
            # Start computing this layer while Python builds the next one's graph: the overlap
            # mlx-lm's generate_step gets from async_eval, within one stage.
            mx.async_eval(hidden)
        return hidden

    def logits(self, hidden: mx.array) -> mx.array:
        """Last stage only: final norm and head on the last position -> ``[vocab]``."""
        return self.adapter.head(hidden[:, -1:, :])[0, -1]

    def row_logits(self, hidden: mx.array) -> mx.array:
        """Last stage, a decode micro-batch: hidden ``[rows, 1, D]`` -> logits ``[rows, vocab]``."""
        return self.adapter.head(hidden)[:, -1]


def _read_architecture(model_path: Path) -> str:
    import json

    config = json.loads((model_path / "config.json").read_text())
    return config.get("model_type") or config.get("text_config", {}).get("model_type", "")


def _evaluate_with_progress(stage: StageModel, progress: ProgressFn) -> None:
    # Evaluating layer by layer reads only this shard's tensors and lets the caller show progress.
    count = len(stage.layers)
    for done, layer in enumerate(stage.layers, start=1):
        mx.eval(layer.parameters())
        progress(done / (count + 1), f"layer {stage.layer_indices[done - 1]} loaded")
    mx.eval(stage.model.parameters())
    progress(1.0, "shard loaded")


def _lazy_model(path: Path) -> tuple[nn.Module, StageAdapter, str]:
    """The whole model with lazy weights: nothing is read from disk until evaluated."""
    from mlx_lm.utils import load_model

    architecture = _read_architecture(path)
    try:
        model, _ = load_model(path, lazy=True, strict=True)
    except (FileNotFoundError, ValueError) as error:
        raise ModelError(f"cannot load the checkpoint at {path}: {error}") from error
    return model, adapter_for(model, architecture), architecture


def _load_directory(
    path: Path, start: int, end: int, is_first: bool, is_last: bool, plan: ExpertPlan | None
) -> StageModel:
    model, adapter, architecture = _lazy_model(path)
    _check_layer_range(adapter.num_layers, start, end, path)
    adapter.keep_only(start, end, is_first, is_last)
    if plan is not None:
        _distribute_experts(model, adapter, SafetensorsIndex(path), range(start, end), plan)
    return StageModel(model, adapter, architecture, start, end, is_first, is_last)


class ExpertPlan:
    """For a stage node: which experts of its MoE layers it holds, which other nodes hold the rest,
    and the dispatcher (the engine) that reaches them."""

    def __init__(self, held: dict[int, list[int]], remote: dict[int, dict[str, list[int]]], dispatcher):
        self.held, self.remote, self.dispatcher = held, remote, dispatcher


def _expert_module(model, adapter: StageAdapter, layer: int) -> tuple[str, nn.Module]:
    module_path = adapter.expert_module_path(layer)
    module = child(model, module_path) if module_path else None
    if module is None:
        raise ModelError(
            f"layer {layer} of the {adapter.architecture} model has no routed-expert "
            "module of mlx-lm's switch_layers (SwitchGLU / SwitchMLP, called as experts(x, "
            "indices)); expert parallelism can only spread experts held that way"
        )
    return module_path, module


def _distribute_experts(model, adapter: StageAdapter, index, layers, plan: ExpertPlan) -> None:
    """Replace each split layer's expert module by a dispatching one holding only this node's
    experts, read from ``index`` (safetensors or GGUF: ``read_rows``)."""
    for layer in layers:
        if layer not in plan.remote:
            continue  # dense layer, or every expert is here
        module_path, module = _expert_module(model, adapter, layer)
        held = plan.held.get(layer, [])
        table = ExpertTable(expert_count(module), held, plan.remote[layer])
        if held:
            keep_experts(module, module_path, index, held)
        parent_path, _, name = module_path.rpartition(".")
        child(model, parent_path)[name] = DistributedSwitchGLU(
            layer, module if held else None, table, plan.dispatcher
        )


def load_expert_host(path: str | Path, groups: dict[int, list[int]], stats: ExpertStats) -> ExpertHost:
    """The experts ``groups`` (layer -> expert ids) of the checkpoint at ``path``, and nothing else."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_loader import GgufExpertIndex, read_layout

        layout = read_layout(path)
        model = layout.build()  # lazy: only the held experts are ever read
        adapter, index = adapter_for(model, layout.config["model_type"]), GgufExpertIndex(path, layout)
    elif path.is_dir() and (path / "config.json").is_file():
        model, adapter, _ = _lazy_model(path)
        index = SafetensorsIndex(path)
    else:
        raise ModelError(f"{path} is not a GGUF file or a checkpoint directory with config.json")
    modules = {}
    for layer, ids in sorted(groups.items()):
        module_path, module = _expert_module(model, adapter, layer)
        num_experts = expert_count(module)
        if not ids or min(ids) < 0 or max(ids) >= num_experts:
            raise ModelError(f"expert ids {ids} are outside layer {layer}'s {num_experts} experts")
        keep_experts(module, module_path, index, ids)
        mx.eval(module.parameters())
        local_index = np.full(num_experts, -1, dtype=np.int32)
        local_index[ids] = np.arange(len(ids), dtype=np.int32)
        modules[layer] = (module, local_index)
    return ExpertHost(modules, stats)


def _load_gguf(
    path: Path, start: int, end: int, is_first: bool, is_last: bool, plan: ExpertPlan | None
) -> StageModel:
    from .gguf_loader import GgufExpertIndex, load_gguf, read_layout

    layout = read_layout(path)
    model = layout.build()  # random init stays lazy: every kept parameter is replaced below
    architecture = layout.config["model_type"]
    adapter = adapter_for(model, architecture)
    _check_layer_range(adapter.num_layers, start, end, path)
    adapter.keep_only(start, end, is_first, is_last)
    wanted = {name for name, _ in tree_flatten(model.parameters())}
    if plan is not None:  # split layers' experts: only this node's rows, read below
        split = [f"{adapter.expert_module_path(layer)}." for layer in plan.remote if start <= layer < end]
        wanted = {name for name in wanted if not name.startswith(tuple(split))}
    checkpoint = load_gguf(path, keep=wanted.__contains__, layout=layout)  # only these are read
    missing = sorted(wanted - checkpoint.weights.keys())
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    model.load_weights(list(checkpoint.weights.items()), strict=False)
    if plan is not None:
        _distribute_experts(model, adapter, GgufExpertIndex(path, layout), range(start, end), plan)
    model.eval()
    return StageModel(model, adapter, architecture, start, end, is_first, is_last)


def _check_layer_range(num_layers: int, start: int, end: int, path: Path) -> None:
    if not 0 <= start < end <= num_layers:
        raise ModelError(
            f"layer range [{start}, {end}) is outside the {num_layers} layers of the model at {path}"
        )


def load_stage(
    model_path: str | Path,
    start: int,
    end: int,
    is_first: bool,
    is_last: bool,
    progress: ProgressFn = lambda fraction, message: None,
    experts: ExpertPlan | None = None,
) -> StageModel:
    """Load layers ``[start, end)`` of the model at ``model_path`` (a GGUF file or a directory);
    with ``experts``, only the routed experts the plan gives this node."""
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stage = _load_gguf(path, start, end, is_first, is_last, experts)
    elif path.is_dir() and (path / "config.json").is_file():
        stage = _load_directory(path, start, end, is_first, is_last, experts)
    else:
        raise ModelError(f"{path} is not a GGUF file or a checkpoint directory with config.json")
    _evaluate_with_progress(stage, progress)
    stage.adapter.check_ends(is_first, is_last)
    return stage
