"""The generic stage adapter: what a pipeline stage needs, derived from an mlx-lm model object.

mlx-lm's model classes run the whole stack in one ``__call__``; a pipeline stage runs a slice of
it. Nearly every family has the same shape: a *backbone* module (``model.model``, Llama 4's
``language_model.model``) holding a token embedding, a list of transformer layers called as
``layer(h, mask, cache)`` and a final norm, and a parent module that applies the output head
(``lm_head``, or the tied embedding's ``as_linear``) and whatever the family does to the logits.
``StageAdapter`` finds those parts by structure, not by name lists, and reuses the family's own
code for the two ends:

- the embedding is the backbone's own ``__call__`` run with no layers and no final norm, so any
  input scaling the family applies (Gemma's sqrt(hidden), Granite's embedding multiplier) stays;
- the head is the parent's own ``__call__`` with the backbone replaced by a pass-through, so tied
  embeddings, logit scaling (Granite) or soft-capping stay exactly as the family computes them;
- per-layer caches are copies of what the family's ``make_cache`` builds (rotating caches for
  sliding-window layers), and each layer gets the mask its cache kind asks for, built from this
  stage's own cache of that kind, as mlx-lm's backbones build them from the first of each kind;
- a layer's routed experts are the module of mlx-lm's ``switch_layers`` (``SwitchGLU``,
  ``SwitchMLP``, or any module holding ``SwitchLinear`` projections called as
  ``experts(x, indices)``) inside it, wherever the family puts it.

A model whose shape does not fit gets a ModelError saying what is missing. Families that differ
in one of these steps subclass the adapter and say why (``worker/families/*.py``).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import (
    BatchRotatingKVCache,
    ChunkedKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
)

from pomona.errors import ModelError

# The cache kinds of attention layers; a layer with another kind (ArraysCache, MambaCache, ...)
# keeps a recurrent state and is called with another mask: not the common shape.
_ATTENTION_CACHES = (KVCache, RotatingKVCache, ChunkedKVCache, QuantizedKVCache)
_EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)
_LINEARS = (nn.Linear, nn.QuantizedLinear)
_SWITCH_PROJECTIONS = (SwitchLinear, QuantizedSwitchLinear)
_SEARCH_DEPTH = 3  # the backbone sits at most this deep (Llama 4: language_model.model)


def child(module: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at a dotted path ("model.layers.3.mlp"), or None where there is none."""
    for part in dotted.split("."):
        if isinstance(module, list):
            index = int(part)
            module = module[index] if index < len(module) else None
        elif isinstance(module, nn.Module) and part in module:
            module = module[part]
        else:
            return None
    return module


def is_expert_module(module: Any) -> bool:
    """mlx-lm's routed-expert modules: SwitchGLU / SwitchMLP, or any module whose projections are
    stacked SwitchLinear layers and which the family calls as ``experts(x, indices)``."""
    if isinstance(module, (SwitchGLU, SwitchMLP)):
        return True
    if not isinstance(module, nn.Module):
        return False
    projections = [m for m in module.children().values() if isinstance(m, _SWITCH_PROJECTIONS)]
    parameters = list(inspect.signature(type(module).__call__).parameters)[1:]
    return bool(projections) and len(parameters) == 2


def expert_count(module: nn.Module) -> int:
    """Routed experts in an expert module: the stacked axis of its SwitchLinear projections."""
    for projection in module.children().values():
        if isinstance(projection, _SWITCH_PROJECTIONS):
            return projection.num_experts
    raise ModelError(f"{type(module).__name__} holds no SwitchLinear projections")


class _Passthrough(nn.Module):
    """Stands in for the backbone when the parent's own ``__call__`` computes the head: returns
    the (already normalised) hidden states and still offers the embedding for tied heads."""

    def __init__(self, embedding_name: str, embedding: nn.Module | None):
        super().__init__()
        if embedding is not None:
            self[embedding_name] = embedding

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        # The parent passes what it got as its first argument, by position or by keyword
        # (MiniMax: ``self.model(inputs=inputs, mask=mask, cache=cache)``).
        return args[0] if args else next(iter(kwargs.values()))


def _find_backbone(model: nn.Module) -> tuple[str, nn.Module, str, str]:
    """(path, module, layer-list name, embedding name) of the module that holds the layers and
    the token embedding, searched breadth first from the model."""
    frontier: list[tuple[str, nn.Module]] = [("", model)]
    for _ in range(_SEARCH_DEPTH + 1):
        following = []
        for path, module in frontier:
            children = module.children()
            lists = [n for n, v in children.items()
                     if isinstance(v, list) and v and all(isinstance(x, nn.Module) for x in v)]
            embeddings = [n for n, v in children.items() if isinstance(v, _EMBEDDINGS)]
            if lists and embeddings:
                return path, module, lists[0], embeddings[0]
            following += [(f"{path}.{n}" if path else n, v) for n, v in children.items()
                          if isinstance(v, nn.Module)]  # fmt: skip
        frontier = following
    raise ModelError(
        f"{type(model).__name__} has no module holding both a list of layers and a token "
        "embedding, so it cannot be split into pipeline stages"
    )


class StageAdapter:
    """What a stage needs from one mlx-lm model, found by structure. Bind it to the whole model,
    before ``keep_only`` drops what the stage does not hold."""

    def __init__(self, model: nn.Module, architecture: str):
        self.model, self.architecture = model, architecture
        path, backbone, self.layers_name, self.embed_name = _find_backbone(model)
        self.backbone_path = path
        self.parent_path, _, self.backbone_name = path.rpartition(".")
        norms = [n for n, v in backbone.children().items()
                 if isinstance(v, nn.Module) and "norm" in type(v).__name__.lower()]  # fmt: skip
        if not norms:
            raise ModelError(f"{architecture}: the backbone {type(backbone).__name__} has no final norm")
        self.norm_name = norms[0]
        # The output projection: a linear layer beside the backbone, mapping to the vocabulary.
        vocab = backbone[self.embed_name].weight.shape[0]
        heads = [n for n, v in self._parent().children().items()
                 if isinstance(v, _LINEARS) and v.weight.shape[0] == vocab]  # fmt: skip
        self.head_path = None  # no output projection of its own: the head is the tied embedding
        if heads:
            self.head_path = f"{self.parent_path}.{heads[0]}" if self.parent_path else heads[0]
        self.tied_embeddings = self.head_path is None
        layers = self.backbone[self.layers_name]
        self.num_layers = len(layers)
        self._check_layer_calls(layers)
        self._cache_prototypes = self._read_cache_kinds(model)
        self._expert_paths = {i: self._find_experts(i, layer) for i, layer in enumerate(layers)}
        self._embedder: nn.Module | None = None
        self._header: nn.Module | None = None

    # -- structure -------------------------------------------------------------------------------

    @property
    def backbone(self) -> nn.Module:
        return child(self.model, self.backbone_path)

    def _parent(self) -> nn.Module:
        return child(self.model, self.parent_path) if self.parent_path else self.model

    @property
    def layers(self) -> list:
        return self.backbone[self.layers_name]

    def layer_path(self, layer: int) -> str:
        return f"{self.backbone_path}.{self.layers_name}.{layer}"

    def expert_module_path(self, layer: int) -> str | None:
        """Dotted path of layer ``layer``'s routed-expert module; None for a dense layer."""
        return self._expert_paths.get(layer)

    def _find_experts(self, index: int, layer: nn.Module) -> str | None:
        for path, module in layer.named_modules():
            if path and is_expert_module(module):
                return f"{self.layer_path(index)}.{path}"
        return None

    def _check_layer_calls(self, layers: list) -> None:
        for index, layer in enumerate(layers):
            parameters = list(inspect.signature(type(layer).__call__).parameters.values())[1:]
            names = [p.name for p in parameters]
            required = [p for p in parameters if p.default is inspect.Parameter.empty]
            if names[1:3] != ["mask", "cache"] or len(required) > 3:
                raise ModelError(
                    f"{self.architecture}: layer {index} ({type(layer).__name__}) is called as "
                    f"({', '.join(names)}), not (hidden, mask, cache): a stage cannot run it alone"
                )

    def _read_cache_kinds(self, model: nn.Module) -> list:
        make_cache = getattr(model, "make_cache", None)
        caches = make_cache() if callable(make_cache) else [KVCache() for _ in range(self.num_layers)]
        if len(caches) != self.num_layers:
            raise ModelError(
                f"{self.architecture}: make_cache gives {len(caches)} caches for "
                f"{self.num_layers} layers; a stage cannot tell which layer keeps which"
            )
        for index, cache in enumerate(caches):
            if not isinstance(cache, _ATTENTION_CACHES):
                raise ModelError(
                    f"{self.architecture}: layer {index} keeps a {type(cache).__name__} (a recurrent "
                    "state, not attention keys and values); pipeline stages support attention layers only"
                )
        return caches

    # -- the stage's shard -------------------------------------------------------------------------

    def keep_only(self, start: int, end: int, is_first: bool, is_last: bool) -> None:
        """Drop every module outside the stage, in place, keeping parameter names aligned.

        Layers before ``start`` become ``None`` (like mlx-lm's PipelineMixin) so that layer ``i``
        is still ``layers.i``; layers from ``end`` on are cut off.
        """
        backbone = self.backbone
        backbone[self.layers_name] = [None] * start + backbone[self.layers_name][start:end]
        if not is_first and not (is_last and self.tied_embeddings):
            del backbone[self.embed_name]
        if not is_last:
            del backbone[self.norm_name]
            if self.head_path is not None:
                parent = self._parent()
                head_name = self.head_path.rpartition(".")[2]
                if head_name in parent:
                    del parent[head_name]
        self._embedder = self._header = None  # rebuilt from what is left when first used

    # -- running a shard -------------------------------------------------------------------------

    def embed(self, token_ids: mx.array) -> mx.array:
        """Token ids ``[B, L]`` -> the hidden states the first layer sees ``[B, L, D]``."""
        if self._embedder is None:
            shell = copy.copy(self.backbone)  # shares the embedding; its own layer list
            shell[self.layers_name] = []
            shell[self.norm_name] = nn.Identity()
            self._embedder = shell
        return self._embedder(token_ids, cache=[None] * self.num_layers)  # [B, L, D]

    def head(self, hidden: mx.array) -> mx.array:
        """Hidden states after the last layer ``[B, L, D]`` -> logits ``[B, L, vocab]``."""
        if self._header is None:
            shell = copy.copy(self._parent())  # shares the head; the backbone passes through
            embedding = self.backbone.get(self.embed_name) if self.tied_embeddings else None
            shell[self.backbone_name] = _Passthrough(self.embed_name, embedding)
            self._header = shell
        return self._header(self.backbone[self.norm_name](hidden))

    def check_ends(self, is_first: bool, is_last: bool) -> None:
        """Run the family's own embedding and head code once on one position, so that a family
        whose code cannot run them apart from the layers fails at load, saying so."""
        try:
            if is_first:
                mx.eval(self.embed(mx.array([[0]], dtype=mx.int32)))
            if is_last:
                width = self.backbone[self.norm_name].weight.shape[-1]
                mx.eval(self.head(mx.zeros((1, 1, width))))
        except Exception as error:  # whatever the family's code raises: reported, not served
            end = "embedding" if is_first else "head"
            raise ModelError(
                f"{self.architecture}: the family's own code cannot run the {end} of a stage "
                f"({type(error).__name__}: {error}); it needs an adapter in worker/families"
            ) from error

    def make_cache(self, layer_index: int) -> Any:
        """A fresh cache of the kind the family's ``make_cache`` gives layer ``layer_index``."""
        return copy.deepcopy(self._cache_prototypes[layer_index])

    def model_caches(self) -> list:
        """Fresh caches for every layer of the model (also those outside this stage): what the
        family keeps where, e.g. to tell whether the whole ring can keep prompts."""
        return [self.make_cache(i) for i in range(self.num_layers)]

    def masks(self, hidden: mx.array, layer_indices: list[int], caches: list) -> list:
        """One attention mask per local layer: one per cache kind, from this stage's first cache
        of that kind (a sliding-window layer's window is its rotating cache's size)."""
        by_kind: dict[tuple, Any] = {}
        masks = []
        for cache in caches:
            window = cache.max_size if isinstance(cache, (RotatingKVCache, BatchRotatingKVCache)) else None
            kind = (type(cache), window)
            if kind not in by_kind:
                by_kind[kind] = self.mask_for(hidden, cache, window)
            masks.append(by_kind[kind])
        return masks

    def mask_for(self, hidden: mx.array, cache: Any, window: int | None) -> Any:
        return create_attention_mask(hidden, cache, window_size=window)
