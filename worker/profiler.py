"""The node's compute profile of a model (`profile_compute`, run before any shard loads) and the
on-node cache of those profiles.

It never reads a weight: the mlx-lm model skeleton is built from config.json (or a GGUF header) and
quantized like the checkpoint (bits, group size, float dtype per module); only one representative
layer per distinct layer *kind* (dense vs MoE, chunked vs global attention, ...) gets random
weights, is timed at decode (one token at a short and a long context, its KV cache filled with
random keys and values), on one prefill chunk and, for MoE, one routed expert on one token, and
is freed: a huge model profiles on a small Mac. Embedding and head are timed on one position.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, load_config

from pomona.errors import ModelError
from pomona.fetch import cache_dir as pomona_cache_dir
from pomona.fetch import default_model_path
from pomona.modelinfo import DEFAULT_CONTEXT_LENGTH, _safetensors_sizes
from pomona.profiles import ComputeProfile

from .families import StageAdapter, adapter_for
from .families.base import child, expert_count
from .gguf_loader import read_layout

PROFILE_FORMAT = 1  # bump when what is measured changes, so that older cached profiles miss
MIN_SAMPLE_S = 0.03
MAX_REPEATS = 7
DEFAULT_TIME_BUDGET_S = 60.0
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# GGML tensor types as the loader delivers them (like mx.load): F32/F16/BF16 as they are; every
# other type's scales and biases, or dequantized values (K-quants, ...), are float16.
_GGUF_FLOATS = {0: mx.float32, 1: mx.float16, 30: mx.bfloat16}

DtypeFn = Callable[[nn.Module, str], mx.Dtype]  # (model, full parameter path) -> stored float dtype


@dataclass
class _Checkpoint:
    """What a profile needs from a checkpoint, read from its config or header only."""

    build: Callable[[], nn.Module]  # the whole model, its random init lazy (never evaluated)
    model_type: str
    quantize: Callable[[str, nn.Module], bool | dict]  # nn.quantize predicate on full module paths
    quantization: dict[str, Any]  # nn.quantize defaults: group_size, bits, mode
    float_dtype: DtypeFn
    context_length: int
    experts_per_token: int
    identity: dict[str, Any]  # what decides the above, as data: hashed into the cache key


def measure_s(fn: Callable[[], None], budget_s: float) -> float:
    """Median seconds of `fn()` after one warm-up call: up to MAX_REPEATS samples, fewer once
    `budget_s` is spent, at least one unless the warm-up alone took the whole budget. A sample
    calls `fn` back to back for at least MIN_SAMPLE_S and divides: a node whose CPU time is
    rationed (a quota, thermal limits) shows its sustained speed, not a burst."""
    start = time.perf_counter()
    fn()
    warm_up_s = time.perf_counter() - start
    if warm_up_s >= budget_s:
        return warm_up_s  # a call this slow dwarfs the first call's allocation overhead
    times: list[float] = []
    while len(times) < MAX_REPEATS and (not times or time.perf_counter() - start < budget_s):
        began, calls = time.perf_counter(), 0
        while calls == 0 or time.perf_counter() - began < MIN_SAMPLE_S:
            fn()
            calls += 1
        times.append((time.perf_counter() - began) / calls)
    return statistics.median(times)


class _Clock:
    """Shares what is left of the time budget evenly among the measurements still to come, so that
    slow setup (random weights, KV fill) shortens later measurements instead of overrunning."""

    def __init__(self, budget_s: float, measurements: int):
        self.deadline, self.left = time.monotonic() + budget_s, measurements

    def time(self, fn: Callable[[], None]) -> float:
        share_s = max(0.0, self.deadline - time.monotonic()) / max(1, self.left)
        self.left -= 1
        return measure_s(fn, share_s)  # looked up at call time: tests count the calls


def _directory_checkpoint(path: Path) -> _Checkpoint:
    config = load_config(path)
    text = {**config, **(config.get("text_config") or {})}  # llama4 nests its settings
    model_class, args_class = _get_classes(config)
    quantization = config.get("quantization") or {}
    group_size = int(quantization.get("group_size", 64))
    overrides = {k: v for k, v in quantization.items() if isinstance(v, (dict, bool))}  # per module
    # mlx-lm quantizes exactly the modules whose `.scales` were saved, which the safetensors headers
    # list. The profile must not need the files: without readable headers, mlx_lm.convert's rule.
    try:
        files = sorted(path.glob("model*.safetensors"))
        saved = {n for f in files for n in _safetensors_sizes(f) if n.endswith(".scales")} or None
    except ModelError:
        saved = None

    def quantize(module_path: str, module: nn.Module) -> bool | dict:
        if not quantization or not hasattr(module, "to_quantized"):
            return False
        if module_path in overrides:
            return overrides[module_path]
        if saved is not None:
            return f"{module_path}.scales" in saved
        return module.weight.shape[-1] % group_size == 0

    dtype = _DTYPES.get(text.get("torch_dtype") or text.get("dtype"), mx.bfloat16)

    def float_dtype(model: nn.Module, parameter: str) -> mx.Dtype:
        # As mlx_lm.convert casts: DeepSeek-V3's cast_predicate keeps its correction bias float32.
        keep = getattr(model, "cast_predicate", None)
        return dtype if keep is None or keep(parameter) else mx.float32

    defaults = {"group_size": group_size, "bits": int(quantization.get("bits", 4)),
                "mode": quantization.get("mode", "affine")}  # fmt: skip
    return _Checkpoint(
        lambda: model_class(args_class.from_dict(config)), config["model_type"], quantize, defaults,
        float_dtype, int(text.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH),
        int(text.get("num_experts_per_tok") or 0), {"config": config, "scaled": sorted(saved or ())},
    )


def _gguf_checkpoint(path: Path) -> _Checkpoint:
    layout = read_layout(path)  # the header only: config, names, per-module quantization
    types = {layout.modules[t.name]: t.ggml_type for t in layout.header.tensors}

    # mx.load gives quantized tensors' scales and biases as float16, other floats as stored.
    float_dtype = lambda _model, parameter: _GGUF_FLOATS.get(types.get(parameter, 1), mx.float16)  # noqa: E731
    config = layout.config
    return _Checkpoint(
        layout.skeleton, config["model_type"],
        lambda module_path, _module: layout.quantization.get(module_path, False),
        {"group_size": 32, "bits": 4, "mode": "affine"}, float_dtype,
        int(config["max_position_embeddings"]), int(config.get("num_experts_per_tok") or 0),
        {"config": config, "tensor_types": types},
    )


def _read_checkpoint(model_path: str | Path) -> _Checkpoint:
    if str(model_path) == "default":
        model_path = default_model_path()
    path = Path(model_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _directory_checkpoint(path)
    if path.is_file():
        return _gguf_checkpoint(path)
    raise ModelError(f"{path} is not a GGUF file or a checkpoint directory with config.json")


def _randomize(model: nn.Module, module: nn.Module, prefix: str, float_dtype: DtypeFn) -> None:
    """Fresh random parameters of the checkpoint's dtypes for `module` (at `prefix` in `model`).
    Packed weights get random bits directly (no float copy of a huge layer to quantize), with scales
    and biases that keep values near +-1/sqrt(fan-in) like floats: no inf/NaN to skew routing."""
    updates = []
    for module_path, sub in module.named_modules():
        bits = getattr(sub, "bits", 0) if "scales" in sub else 0
        for leaf, value in sub.items():
            if not isinstance(value, mx.array):
                continue
            name = f"{module_path}.{leaf}" if module_path else leaf
            dtype = float_dtype(model, f"{prefix}.{name}")
            if value.dtype == mx.uint32:
                new = mx.random.randint(0, 2**31 - 1, value.shape).astype(mx.uint32)
            elif not mx.issubdtype(value.dtype, mx.floating):
                new = mx.random.randint(0, 8, value.shape).astype(value.dtype)
            elif bits and leaf in ("scales", "biases"):
                step = 2.0 / (2**bits * (sub.group_size * value.shape[-1]) ** 0.5)
                new = mx.full(value.shape, step if leaf == "scales" else -step * (2**bits - 1) / 2, dtype)
            elif value.ndim >= 2:
                new = (mx.random.normal(value.shape) / value.shape[-1] ** 0.5).astype(dtype)
            else:
                new = (mx.ones if leaf == "weight" else mx.zeros)(value.shape, dtype)  # norms, biases
            updates.append((name, new))
    module.update(tree_unflatten(updates))
    mx.eval(module.parameters())


def _layer_kind(model, adapter: StageAdapter, index: int, float_dtype: DtypeFn) -> tuple:
    """Layers with the same module tree, parameter shapes and dtypes and cache type cost the same."""
    layer, prefix = adapter.layers[index], adapter.layer_path(index)
    structure = tuple((path, type(module).__name__) for path, module in layer.named_modules())
    params = tree_flatten(layer.parameters())
    dtypes = [float_dtype(model, f"{prefix}.{n}") if mx.issubdtype(v.dtype, mx.floating) else v.dtype
              for n, v in params]  # fmt: skip
    shapes = tuple((name, tuple(value.shape), dtype) for (name, value), dtype in zip(params, dtypes))
    return structure, shapes, type(adapter.make_cache(index)).__name__


def _random_hidden(length: int, width: int, dtype: mx.Dtype) -> mx.array:
    hidden = mx.random.normal((1, length, width)).astype(dtype)  # [1, L, D]
    mx.eval(hidden)  # made before the timed calls: random generation is not the layer's cost
    return hidden


def _filled_cache(adapter: StageAdapter, index: int, probe: Any, context: int) -> Any:
    """A fresh cache of the layer's kind holding `context` tokens of random keys and values, shaped
    like what the layer wrote into `probe` (MLA caches a latent: whatever it is, it is copied)."""
    cache, keys, values = adapter.make_cache(index), probe.keys, probe.values  # [B, H, T, D]
    cache.update_and_fetch(
        mx.random.normal((*keys.shape[:2], context, keys.shape[3])).astype(keys.dtype),
        mx.random.normal((*values.shape[:2], context, values.shape[3])).astype(values.dtype),
    )
    mx.eval(cache.keys, cache.values)  # made before the timed calls, like the inputs
    return cache


def _time_layer(model, adapter, checkpoint, index, clock, width, dtype, chunk, contexts):
    """(decode at each of `contexts`, prefill of `chunk` tokens, one expert) seconds of a layer."""
    layer = adapter.layers[index]

    def run(hidden: mx.array, cache: Any) -> None:
        mask = adapter.masks(hidden, [index], [cache])[0]  # as the stage builds it
        mx.eval(layer(hidden, mask, cache=cache))

    token, prompt = _random_hidden(1, width, dtype), _random_hidden(chunk, width, dtype)
    probe = adapter.make_cache(index)
    run(token, probe)  # the first call: allocations, and the shapes of what the layer caches
    prefill_s = clock.time(lambda: run(prompt, adapter.make_cache(index)))
    decode = []
    for context in contexts:
        cache = _filled_cache(adapter, index, probe, context)

        def step(cache: Any = cache) -> None:
            run(token, cache)
            if cache.is_trimmable():
                cache.trim(1)  # keep the context where it is measured

        decode.append(clock.time(step))
    experts = child(model, path) if (path := adapter.expert_module_path(index)) else None
    if experts is None:
        return (*decode, prefill_s, 0.0)  # a dense layer
    top_k = max(1, checkpoint.experts_per_token)
    chosen = random.sample(range(expert_count(experts)), top_k)
    indices = mx.array(chosen, dtype=mx.int32).reshape(1, 1, top_k)  # [1, 1, k]
    return (*decode, prefill_s, clock.time(lambda: mx.eval(experts(token, indices))) / top_k)


def _measure(checkpoint: _Checkpoint, chunk: int, short: int, long: int, budget_s: float) -> ComputeProfile:
    model = checkpoint.build()
    nn.quantize(model, **checkpoint.quantization, class_predicate=checkpoint.quantize)  # lazy, free
    adapter = adapter_for(model, checkpoint.model_type)
    backbone, float_dtype = adapter.backbone, checkpoint.float_dtype
    num_layers = adapter.num_layers
    kinds: dict[tuple, list[int]] = {}
    for index in range(num_layers):
        kinds.setdefault(_layer_kind(model, adapter, index, float_dtype), []).append(index)
    moe = [i for i in range(num_layers) if (p := adapter.expert_module_path(i)) and child(model, p)]
    clock = _Clock(budget_s, 2 + sum(3 + (indices[0] in moe) for indices in kinds.values()))

    for name in (adapter.embed_name, adapter.norm_name):
        _randomize(model, backbone[name], f"{adapter.backbone_path}.{name}", float_dtype)
    if adapter.head_path is not None:
        _randomize(model, child(model, adapter.head_path), adapter.head_path, float_dtype)
    adapter.check_ends(is_first=True, is_last=True)  # a family whose ends cannot run apart: say so
    token = mx.array([[1]], dtype=mx.int32)
    embed_s = clock.time(lambda: mx.eval(adapter.embed(token)))
    embedded = adapter.embed(token)  # [1, 1, D]: the activations' width and dtype
    width, dtype = embedded.shape[-1], embedded.dtype
    position = _random_hidden(1, width, dtype)
    head_s = clock.time(lambda: mx.eval(mx.argmax(adapter.head(position)[0, -1])))
    adapter.keep_only(0, num_layers, is_first=False, is_last=False)  # frees embedding, head

    by_layer: dict[int, tuple[float, ...]] = {}
    for indices in kinds.values():
        index, layers = indices[0], adapter.layers
        _randomize(model, layers[index], adapter.layer_path(index), float_dtype)
        times = _time_layer(model, adapter, checkpoint, index, clock, width, dtype, chunk, (short, long))
        by_layer.update(dict.fromkeys(indices, times))
        layers[index] = None  # freed before the next kind is made: big layers on small Macs
        gc.collect()
        mx.clear_cache()
    columns = [tuple(by_layer[i][k] for i in range(num_layers)) for k in range(4)]
    return ComputeProfile(
        decode_layer_s=columns[0], decode_layer_long_s=columns[1], short_context=short, long_context=long,
        prefill_layer_s=columns[2], prefill_chunk_tokens=chunk, embed_s=embed_s, head_s=head_s,
        expert_s=columns[3] if moe else (), experts_per_token=checkpoint.experts_per_token if moe else 0,
    )


def _cache_key(checkpoint: _Checkpoint, chunk: int, short: int, long: int) -> dict[str, Any]:
    """Machine (platform, processor, MLX device, memory), model config and quantization, versions
    and parameters: a profile measured under any other key is not this one."""
    try:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory_bytes = 0
    try:
        device_info = {k: str(v) for k, v in mx.device_info().items()}  # Metal: chip and memory
    except (AttributeError, RuntimeError):
        device_info = {}
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "device": str(mx.default_device()), "device_info": device_info, "memory_bytes": memory_bytes}
    model_json = json.dumps(checkpoint.identity, sort_keys=True, default=str)
    return {"format": PROFILE_FORMAT, "machine": machine,
            "model": hashlib.sha256(model_json.encode()).hexdigest(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "prefill_chunk_tokens": chunk, "short_context": short, "long_context": long}


def _read_cached(file: Path, key: dict[str, Any]) -> ComputeProfile | None:
    try:
        entry = json.loads(file.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["profile"].items()}
        return ComputeProfile(**fields) if entry["key"] == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: measure again


def profile_compute_cached(
    model_path: str | Path,
    prefill_chunk_tokens: int = 256,
    short_context: int = 64,
    long_context: int = 2048,
    cache_dir: str | Path | None = None,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> tuple[ComputeProfile, bool]:
    """`profile_compute`, and whether the profile came from the cache."""
    checkpoint = _read_checkpoint(model_path)
    long = max(1, min(long_context, checkpoint.context_length))
    short = max(1, min(short_context, long))
    key = _cache_key(checkpoint, prefill_chunk_tokens, short, long)
    root = Path(cache_dir).expanduser() if cache_dir is not None else pomona_cache_dir() / "profiles"
    file = root / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    if (cached := _read_cached(file, key)) is not None:
        return cached, True
    started = time.monotonic()
    profile = _measure(checkpoint, prefill_chunk_tokens, short, long, time_budget_s)
    took_s = time.monotonic() - started
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(f".{os.getpid()}.tmp")  # renamed into place: never half-written
    partial.write_text(json.dumps({"key": key, "profile": asdict(profile), "profiled_in_s": took_s}))
    os.replace(partial, file)
    return profile, False


def profile_compute(
    model_path: str | Path,
    prefill_chunk_tokens: int = 256,
    short_context: int = 64,
    long_context: int = 2048,
    cache_dir: str | Path | None = None,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> ComputeProfile:
    """This node's seconds per layer (one token at `short_context` and at `long_context`, capped at
    the model's context length; one prefill chunk), embedding, head and routed expert of the model
    at `model_path` (directory, GGUF or "default"), from config / header only, in about
    `time_budget_s`. Cached in `cache_dir` (default `$POMONA_CACHE/profiles`, else
    `~/.cache/pomona/profiles`): a second call returns the stored profile without measuring."""
    return profile_compute_cached(
        model_path, prefill_chunk_tokens, short_context, long_context, cache_dir, time_budget_s
    )[0]
