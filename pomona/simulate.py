"""Simulated clusters: compute profiles of catalogue Macs for a model shape, and SPEC.yaml files.

Owns the roofline cost model (`simulated_compute`), its calibration on published single-node
results (`CALIBRATION`, `calibrate`, `predict_reference`) and the simulation spec parser
(`load_simulation_spec`) that turns `nodes:` of catalogue machines and `link:` kinds into a
`ClusterProfile` the planner reads exactly as it reads a measured one.

The model, per layer and token: time = max(weight bytes / effective bandwidth, FLOPs / effective
FLOPS) + attention over the cached context (KV bytes or FLOPs, whichever binds) + a fixed cost per
layer. The fixed cost is why the efficiencies are fitted jointly: small models on fast chips stop
scaling with bandwidth (llama.cpp: M3 Ultra 92 tok/s vs M1 Max 61 at twice the bandwidth), which a
bandwidth efficiency alone cannot reproduce. No MLX here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pomona.catalogue import Machine, link_kind, link_kind_names, machine
from pomona.errors import ConfigError, PomonaError
from pomona.profiles import (
    COORDINATOR,
    ClusterProfile,
    ComputeProfile,
    LinkProfile,
    NodeProfile,
    PowerProfile,
)
from pomona.shapes import ModelShape, builtin_model, shape_from_config
from pomona.yaml_reader import LineList, LineMap, Reader, compose, is_int, kind

GIB = 2**30
DEFAULT_PREFILL_CHUNK_TOKENS = 512
DEFAULT_SHORT_CONTEXT = 1024
DEFAULT_LONG_CONTEXT = 16384
# macOS lets the GPU wire about three quarters of unified memory by default on large Macs
# (estimate; `sysctl iogpu.wired_limit_mb` raises it).
DEFAULT_USABLE_MEMORY_FRACTION = 0.75

_LLAMA2_7B = {  # the model of llama.cpp discussion 4167 (shape only; q4_0 is 4.5 bits/weight,
    # the same bytes as mlx 4-bit group 64)
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
    "tie_word_embeddings": False, "max_position_embeddings": 4096,
}  # fmt: skip


@dataclass(frozen=True)
class Reference:
    """One published single-node llama.cpp result: tok/s at batch 1 (tg) and in pp512 (pp)."""

    machine: str
    model: str  # "llama-2-7b" or a built-in model name
    bits_per_weight: float  # of the benchmarked file
    tg_tok_s: float
    pp_tok_s: float | None
    source: str
    fitted: bool = True  # False: a validation row, kept out of the fit


_S50 = "llama.cpp discussion #4167 (Llama-2-7B q4_0, pp512/tg128; via apple_silicon.yaml [S50], secondary)"
CALIBRATION: tuple[Reference, ...] = (
    Reference("mac_mini_2023_m2", "llama-2-7b", 4.5, 22.0, 180.0, _S50),
    Reference("mac_mini_2024_m4", "llama-2-7b", 4.5, 24.11, 221.29, _S50),
    Reference("mac_mini_2024_m4_pro", "llama-2-7b", 4.5, 50.74, 439.78, _S50),
    Reference("mac_studio_2022_m1_max", "llama-2-7b", 4.5, 61.19, 530.06, _S50),
    Reference("mac_studio_2025_m4_max_40c", "llama-2-7b", 4.5, 83.1, 886.0, _S50),
    Reference("mac_studio_2022_m1_ultra", "llama-2-7b", 4.5, 83.7, 1030.0, _S50),
    Reference("mac_studio_2023_m2_ultra", "llama-2-7b", 4.5, 94.3, 1238.0, _S50),
    Reference("mac_studio_2025_m3_ultra", "llama-2-7b", 4.5, 92.1, 1471.0, _S50),
    # Q4_K_M averages ~4.8 bits/weight (estimate: 42.5 GB files for 70.6B weights).
    Reference(
        "mac_studio_2025_m3_ultra", "llama-3.3-70b", 4.8, 14.41, 162.30,
        "Geerling, llama-bench Llama 3.3 70B Q4_K_M on M3 Ultra 512GB (beowulf-ai-cluster#17, [S53])",
    ),
    Reference(
        "mac_mini_2023_m2_pro", "llama-2-7b", 4.5, 34.6, None,
        "M2 Pro 19c Mac mini, llama.cpp Aug 2023, 28.91 ms/token (GPU-Benchmarks-on-LLM-Inference#1, [S58])",
        fitted=False,
    ),
    Reference(
        "mac_studio_2025_m3_ultra", "deepseek-v3", 4.8, 20.21, None,
        "Geerling, llama-bench DeepSeek R1 671B Q4_K_M on M3 Ultra 512GB (beowulf-ai-cluster#17, [S53]); "
        "R1 has V3's shape; pp512 (168.9) not compared: predict_reference ignores a chunk's expert reads",
        fitted=False,
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Efficiency:
    """Fitted fractions of peak bandwidth and FLOPS, and the fixed cost per layer."""

    bandwidth: float
    flops: float
    layer_overhead_s: float


def _reference_shape(model: str) -> ModelShape:
    if model == "llama-2-7b":
        return shape_from_config(_LLAMA2_7B, bits=4, group_size=64, name=model)
    return builtin_model(model)


def _token_terms(reference: Reference) -> tuple[float, float, int, float]:
    """(decode weight bytes / bandwidth s, pp FLOPs / peak FLOPS s, layers, bytes scale)."""
    shape, mac = _reference_shape(reference.model), machine(reference.machine)
    scale = reference.bits_per_weight / 4.5  # our shapes are 4.5 bits/weight (4-bit, group 64)
    decode_bytes = (sum(shape.layer_decode_bytes) + shape.info.head_bytes) * scale
    flops = sum(shape.layer_flops_per_token) + shape.head_flops_per_token
    return (
        decode_bytes / mac.memory_bandwidth_bytes_per_s,
        flops / mac.gpu_fp16_flops_per_s,
        shape.num_layers,
        scale,
    )


def _weighted_fit(columns: list[tuple[float, ...]], targets: list[float]) -> list[float]:
    """Least squares in relative error: minimise sum((row . x - t) / t)^2; 1 or 2 unknowns."""
    rows = [[value / target for value in row] for row, target in zip(columns, targets, strict=True)]
    if len(rows[0]) == 1:
        return [sum(r[0] for r in rows) / sum(r[0] ** 2 for r in rows)]
    a11 = sum(r[0] * r[0] for r in rows)
    a12 = sum(r[0] * r[1] for r in rows)
    a22 = sum(r[1] * r[1] for r in rows)
    b1, b2 = sum(r[0] for r in rows), sum(r[1] for r in rows)
    det = a11 * a22 - a12 * a12
    return [(b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det]


@cache
def calibrate() -> Efficiency:
    """Fit the efficiencies on CALIBRATION's fitted rows (decode first, then prefill)."""
    rows = [r for r in CALIBRATION if r.fitted]
    # decode: 1/tg = bytes/bandwidth x (1/eff_bw) + layers x overhead
    terms = [_token_terms(r) for r in rows]
    inverse_bw, overhead = _weighted_fit([(t[0], t[2]) for t in terms], [1 / r.tg_tok_s for r in rows])
    # prefill (pp512, per token): FLOPs/peak x (1/eff_flops) + (bytes/bw/eff_bw + layers x overhead)/512
    pp = [(r, t) for r, t in zip(rows, terms, strict=True) if r.pp_tok_s]
    targets = [1 / r.pp_tok_s - (t[0] * inverse_bw + t[2] * overhead) / 512 for r, t in pp]
    (inverse_flops,) = _weighted_fit([(t[1],) for _, t in pp], targets)
    return Efficiency(bandwidth=1 / inverse_bw, flops=1 / inverse_flops, layer_overhead_s=overhead)


def predict_reference(reference: Reference, efficiency: Efficiency | None = None) -> tuple[float, float]:
    """(tg, pp512) tok/s the fitted model predicts for a calibration row."""
    eff = efficiency or calibrate()
    bytes_s, flops_s, layers, _ = _token_terms(reference)
    decode_s = max(bytes_s / eff.bandwidth, flops_s / eff.flops) + layers * eff.layer_overhead_s
    prefill_s = flops_s / eff.flops + (bytes_s / eff.bandwidth + layers * eff.layer_overhead_s) / 512
    return 1 / decode_s, 1 / prefill_s


# --- compute profile -----------------------------------------------------------------------------


def _distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected experts a chunk of `tokens` touches under uniform routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def simulated_compute(
    mac: Machine,
    shape: ModelShape,
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
    short_context: int = DEFAULT_SHORT_CONTEXT,
    long_context: int = DEFAULT_LONG_CONTEXT,
    efficiency: Efficiency | None = None,
) -> ComputeProfile:
    """What `mac` would measure for `shape`: seconds per layer, expert, embedding and head."""
    eff = efficiency or calibrate()
    bandwidth = mac.memory_bandwidth_bytes_per_s * eff.bandwidth  # bytes/s
    flops = mac.gpu_fp16_flops_per_s * eff.flops  # FLOP/s
    info = shape.info

    def attention_s(layer: int, queries: int, context: int) -> float:
        # decode (queries = 1) reads the layer's cache; prefill computes queries x context pairs.
        attended = shape.attended_tokens(layer, context)
        kv_s = attended * shape.kv_bytes_per_token_layer[layer] / bandwidth
        return max(kv_s, queries * attended * shape.attention_flops_per_context_token[layer] / flops)

    def decode_s(layer: int, context: int) -> float:
        weights_s = max(
            shape.layer_decode_bytes[layer] / bandwidth, shape.layer_flops_per_token[layer] / flops
        )
        return weights_s + attention_s(layer, 1, context) + eff.layer_overhead_s

    def prefill_s(layer: int) -> float:
        read = shape.layer_decode_bytes[layer]
        if info.expert_bytes[layer]:  # a chunk touches more experts than one token does
            touched = _distinct_experts(info.num_experts, shape.experts_per_token, prefill_chunk_tokens)
            read += (touched - shape.experts_per_token) * info.expert_bytes[layer]
        weights_s = max(read / bandwidth, prefill_chunk_tokens * shape.layer_flops_per_token[layer] / flops)
        # the chunk's queries attend to half the chunk on average (causal, from position 0)
        return (
            weights_s
            + attention_s(layer, prefill_chunk_tokens, prefill_chunk_tokens // 2)
            + eff.layer_overhead_s
        )

    def expert_s(layer: int) -> float:
        if not info.expert_bytes[layer]:
            return 0.0
        return max(info.expert_bytes[layer] / bandwidth, shape.expert_flops_per_token[layer] / flops)

    layers = range(info.num_layers)
    return ComputeProfile(
        decode_layer_s=tuple(decode_s(i, short_context) for i in layers),
        decode_layer_long_s=tuple(decode_s(i, long_context) for i in layers),
        short_context=short_context,
        long_context=long_context,
        prefill_layer_s=tuple(prefill_s(i) for i in layers),
        prefill_chunk_tokens=prefill_chunk_tokens,
        embed_s=shape.embed_decode_bytes / bandwidth + eff.layer_overhead_s,
        head_s=max(info.head_bytes / bandwidth, shape.head_flops_per_token / flops) + eff.layer_overhead_s,
        expert_s=tuple(expert_s(i) for i in layers),
        experts_per_token=shape.experts_per_token,
        source=(
            f"simulated (catalogue: {mac.name}; roofline at {eff.bandwidth:.0%} of "
            f"{mac.memory_bandwidth_gbs:g} GB/s and {eff.flops:.0%} of {mac.gpu_fp16_tflops:g} TFLOPS, "
            f"{eff.layer_overhead_s * 1e3:.2f} ms/layer, fitted on llama.cpp results)"
        ),
    )


def catalogue_power(mac: Machine) -> PowerProfile:
    """Idle and busy watts from the catalogue (busy = Apple's max: an upper estimate for decode)."""
    # Apple's own figures say so in their basis; anything else is marked as an estimate of ours.
    label = "" if mac.power_kind == "official" else "estimate: "
    basis = f"estimated (catalogue: {mac.name}, {label}{mac.power_basis})"
    return PowerProfile(idle_w=mac.idle_w, busy_w=mac.max_w, basis=basis)


# --- SPEC.yaml -----------------------------------------------------------------------------------

_TOP_KEYS = (
    "nodes", "link", "links", "coordinator_link", "model", "prefill_chunk_tokens", "short_context",
    "long_context", "usable_memory_fraction",
)  # fmt: skip
_NODE_KEYS = ("machine", "count", "memory_gb", "name")
_LINK_KEYS = ("between", "kind")


def _lookup(reader: Reader, parent: LineMap, key: str, path: str, find: Any) -> Any:
    try:
        return find(parent[key])
    except PomonaError as error:
        reader.bad(parent, key, path, str(error))


def _parse_nodes(reader: Reader, root: LineMap, fraction: float) -> list[tuple[str, str, Machine, int]]:
    """(node name, group prefix, machine, usable bytes) per node, in order."""
    items = root["nodes"]
    if not isinstance(items, LineList) or not items:
        reader.bad(
            root, "nodes", "", f"must be a non-empty list of `- machine: NAME` entries, not {kind(items)}"
        )
    nodes, counters = [], {}
    for index, item in enumerate(items):
        path = f"nodes[{index}]"
        entry = reader.mapping(item, path, items.item_lines[index])
        reader.keys(entry, path, _NODE_KEYS, required=("machine",))
        mac = _lookup(reader, entry, "machine", path, machine)
        count = reader.integer(entry, "count", path, 1, 1)
        memory_gb = entry.get("memory_gb", mac.default_memory_gb)
        if memory_gb not in mac.memory_gb or not is_int(memory_gb):
            options = ", ".join(str(m) for m in mac.memory_gb)
            reader.bad(entry, "memory_gb", path, f"{mac.name} comes with {options} GB, not {kind(memory_gb)}")
        prefix = reader.string(entry, "name", path, mac.short_name)
        for _ in range(count):
            counters[prefix] = counters.get(prefix, 0) + 1
            usable = int(memory_gb * GIB * fraction)
            nodes.append((f"{prefix}-{counters[prefix]}", prefix, mac, usable))
    return nodes


def _link_for(reader: Reader, parent: LineMap, key: str, path: str) -> str:
    return _lookup(reader, parent, key, path, lambda name: link_kind(name).name)


def _fastest_common(first: Machine, second: Machine) -> str:
    # the catalogue lists link kinds fastest first
    return next((k for k in link_kind_names() if k in first.links and k in second.links), "wifi")


def _parse_links(
    reader: Reader, root: LineMap, nodes: list[tuple[str, str, Machine, int]], default: str | None
) -> dict[tuple[str, str], str]:
    """Link kind per unordered node pair: `link:` (or, without it, the fastest kind both have),
    then each `links:` override in order."""
    names, macs = [n[0] for n in nodes], [n[2] for n in nodes]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    kinds = {(names[i], names[j]): default or _fastest_common(macs[i], macs[j]) for i, j in pairs}
    items = root.get("links", LineList())
    if not isinstance(items, LineList):
        reader.bad(root, "links", "", f"must be a list of `- between: [a, b]` entries, not {kind(items)}")
    for index, item in enumerate(items):
        path = f"links[{index}]"
        entry = reader.mapping(item, path, items.item_lines[index])
        reader.keys(entry, path, _LINK_KEYS, required=_LINK_KEYS)
        chosen = _link_for(reader, entry, "kind", path)
        ends = entry["between"]
        if not isinstance(ends, list) or len(ends) != 2:
            reader.bad(
                entry, "between", path, f"must name two nodes or groups, like [a, b], not {kind(ends)}"
            )
        groups = []
        for end in ends:
            members = [n[0] for n in nodes if end in (n[0], n[1])]
            if not members:
                known = ", ".join(dict.fromkeys([n[1] for n in nodes] + names))
                reader.bad(entry, "between", path, f"no node or group {end!r}; known: {known}")
            groups.append(members)
        for a in groups[0]:
            for b in groups[1]:
                if a != b:
                    kinds[tuple(sorted((a, b), key=names.index))] = chosen  # type: ignore[index]
    return kinds


def _check_supported(reader: Reader, pair: tuple[str, str], chosen: str, macs: dict[str, Machine]) -> None:
    both = [k for k in macs[pair[0]].links if k in macs[pair[1]].links]
    if chosen not in both:
        fix = f"links: [{{between: [{pair[0]}, {pair[1]}], kind: {both[0] if both else 'wifi'}}}]"
        problem = f"{pair[0]} ({macs[pair[0]].name}) and {pair[1]} ({macs[pair[1]].name}) share no {chosen}"
        reader.fail("link", None, f"{problem} (both have: {', '.join(both)}); add `{fix}`")


def _model_shape(reader: Reader, root: LineMap, model: ModelShape | str | None) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if model is None:
        if "model" not in root:
            reader.fail("", root.line, "missing required key 'model' (or pass --model NAME)")
        return _lookup(reader, root, "model", "", builtin_model)
    try:
        return builtin_model(model)
    except PomonaError as error:
        raise ConfigError(f"--model: {error}") from None


def load_simulation_spec(path: str | Path, model: ModelShape | str | None = None) -> ClusterProfile:
    """A hypothetical cluster from SPEC.yaml, profiled for `model` (a shape, a built-in name, or
    None to read the spec's `model:` key). ConfigError names the file, line and field."""
    shown, file = str(path), Path(path).expanduser()
    reader = Reader(shown)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{shown}: cannot read the simulation spec ({error})") from None
    root, line = compose(reader, text)
    if not isinstance(root, LineMap):
        reader.fail("", line, f"the top level must be a mapping (`nodes:`, `link:`, ...), not {kind(root)}")
    reader.keys(root, "", _TOP_KEYS, required=("nodes",))
    shape = _model_shape(reader, root, model)
    fraction = root.get("usable_memory_fraction", DEFAULT_USABLE_MEMORY_FRACTION)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        reader.bad(root, "usable_memory_fraction", "", f"must be a number in (0, 1], not {kind(fraction)}")
    chunk = reader.integer(root, "prefill_chunk_tokens", "", DEFAULT_PREFILL_CHUNK_TOKENS, 1)
    short = reader.integer(root, "short_context", "", DEFAULT_SHORT_CONTEXT, 1)
    long = reader.integer(
        root, "long_context", "", min(DEFAULT_LONG_CONTEXT, shape.info.context_length), short
    )

    nodes = _parse_nodes(reader, root, float(fraction))
    default = _link_for(reader, root, "link", "") if "link" in root else None
    coordinator = _link_for(reader, root, "coordinator_link", "") if "coordinator_link" in root else default
    macs = {name: mac for name, _, mac, _ in nodes}
    links: dict[tuple[str, str], LinkProfile] = {}
    for pair, chosen in _parse_links(reader, root, nodes, default).items():
        _check_supported(reader, pair, chosen, macs)
        spec = link_kind(chosen)
        for a, b in (pair, pair[::-1]):
            links[(a, b)] = LinkProfile(a, b, spec.latency_s, spec.latency_p90_s, spec.bandwidth_bytes_per_s)
    computes: dict[str, ComputeProfile] = {}
    profiles = []
    for name, _, mac, usable in nodes:
        spec = link_kind(coordinator or mac.links[0])  # without a setting: the node's fastest
        for a, b in ((COORDINATOR, name), (name, COORDINATOR)):
            links[(a, b)] = LinkProfile(a, b, spec.latency_s, spec.latency_p90_s, spec.bandwidth_bytes_per_s)
        if mac.name not in computes:  # same machine, same profile
            computes[mac.name] = simulated_compute(mac, shape, chunk, short, long)
        power, kv_bytes = catalogue_power(mac), shape.kv_bytes_per_token
        profiles.append(NodeProfile(name, usable, computes[mac.name], power, mac.name, kv_bytes))
    return ClusterProfile(nodes=tuple(profiles), links=links)


def calibration_report() -> list[tuple[Reference, float, float | None]]:
    """(reference, tg error, pp error) as fractions (predicted / published - 1), for people."""
    rows = []
    for ref in CALIBRATION:
        tg, pp = predict_reference(ref)
        rows.append((ref, tg / ref.tg_tok_s - 1, pp / ref.pp_tok_s - 1 if ref.pp_tok_s else None))
    return rows
