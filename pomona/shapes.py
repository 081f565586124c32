"""Model shapes without weights: sizes, FLOPs and bytes per token, computed from config.json.

Owns `ModelShape` (a `ModelInfo` plus what the simulator needs per layer: weight FLOPs per token,
weight bytes a decode token reads, one routed expert's FLOPs, attention cost per cached token, KV
cache bytes per token), `shape_from_config` that derives it analytically, and the built-in real
model shapes in pomona/data/models/*.json (`builtin_model`, `builtin_model_names`).

Sizes follow mlx-lm's affine quantization as mlx-community publishes it: every Linear and
Embedding whose input width divides by the group size stores `bits` per weight plus one 16-bit
scale and one 16-bit bias per group; norms, routers and biases stay 16-bit. Families: llama,
llama4 (interleaved MoE, shared expert, chunked attention), mixtral, qwen3_moe, deepseek_v3 (MLA
with the latent KV cache mlx-lm keeps, dense first layers, shared expert). No MLX here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pomona.errors import ModelError
from pomona.modelinfo import ModelInfo

FLOAT16_BYTES = 2
SUPPORTED_ARCHITECTURES = ("llama", "llama4", "mixtral", "qwen3_moe", "deepseek_v3")


@dataclass(frozen=True)
class ModelShape:
    """A model as the simulator sees it. Per-layer tuples have one entry per transformer block."""

    name: str
    info: ModelInfo
    hidden_size: int
    experts_per_token: int  # router top-k (0 for dense)
    bits: int
    group_size: int
    layer_flops_per_token: tuple[float, ...]  # weight matmuls: attention projections + top-k + shared
    layer_decode_bytes: tuple[int, ...]  # weight bytes one decode token reads (non-expert + top-k)
    expert_flops_per_token: tuple[float, ...]  # one routed expert on one token (0 for dense layers)
    attention_flops_per_context_token: tuple[float, ...]  # one query token against one cached token
    kv_bytes_per_token_layer: tuple[int, ...]  # float16 KV cache per token of context
    attention_window: tuple[int, ...]  # 0: the whole context; n: chunked attention over <= n tokens
    embed_decode_bytes: int  # one embedding row
    head_flops_per_token: float  # output projection
    total_params: int  # each weight once (text model only)
    active_params: int  # weights one token uses

    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token of context, whole model (chunked layers counted in full)."""
        return sum(self.kv_bytes_per_token_layer)

    def attended_tokens(self, layer: int, context: int) -> int:
        window = self.attention_window[layer]
        return min(context, window) if window else context


@dataclass(frozen=True)
class _Part:
    params: int = 0
    num_bytes: int = 0

    def __add__(self, other: _Part) -> _Part:
        return _Part(self.params + other.params, self.num_bytes + other.num_bytes)

    def times(self, count: int) -> _Part:
        return _Part(self.params * count, self.num_bytes * count)


class _Sizer:
    """Bytes of weights under one quantization (mlx-lm's affine scheme)."""

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits, self.group_size = bits, group_size

    def linear(self, in_features: int, out_features: int) -> _Part:
        params = in_features * out_features
        if self.bits >= 16 or in_features % self.group_size:  # mlx-lm leaves these unquantized
            return _Part(params, params * FLOAT16_BYTES)
        groups = params // self.group_size
        # bits per weight, plus a 16-bit scale and a 16-bit bias per group
        return _Part(params, params * self.bits // 8 + groups * 2 * FLOAT16_BYTES)

    @staticmethod
    def vector(size: int) -> _Part:  # norms, routers, biases: kept in 16-bit
        return _Part(size, size * FLOAT16_BYTES)

    def mlp(self, hidden: int, intermediate: int) -> _Part:  # SwiGLU: gate, up, down
        return self.linear(hidden, intermediate).times(2) + self.linear(intermediate, hidden)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # llama4 nests the language model under text_config; its keys win (as in modelinfo).
    return {**config, **(config.get("text_config") or {})}


def _int(text: dict[str, Any], key: str, default: int | None = None) -> int:
    value = text.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"model config lacks a whole-number {key!r} (got {value!r})")
    return value


def _moe_layers(architecture: str, text: dict[str, Any], num_layers: int) -> set[int]:
    if architecture == "mixtral":
        return set(range(num_layers))
    if architecture == "qwen3_moe":
        step = _int(text, "decoder_sparse_step", 1)
        dense = set(text.get("mlp_only_layers") or [])
        return {i for i in range(num_layers) if i not in dense and (i + 1) % step == 0}
    if architecture == "llama4":
        step = _int(text, "interleave_moe_layer_step", 1)  # mlx-lm: i % step == step - 1
        return {i for i in range(num_layers) if i % step == step - 1}
    if architecture == "deepseek_v3":
        first_dense, freq = _int(text, "first_k_dense_replace", 0), _int(text, "moe_layer_freq", 1)
        return {i for i in range(num_layers) if i >= first_dense and i % freq == 0}
    return set()


def _attention(sizer: _Sizer, architecture: str, text: dict[str, Any]) -> tuple[_Part, float, int]:
    """(weights, FLOPs per cached token for one query token, float16 KV bytes per token)."""
    hidden, heads = _int(text, "hidden_size"), _int(text, "num_attention_heads")
    if architecture == "deepseek_v3":
        q_rank, kv_rank = _int(text, "q_lora_rank"), _int(text, "kv_lora_rank")
        nope, rope, v_dim = (_int(text, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        weights = (
            sizer.linear(hidden, q_rank)
            + sizer.vector(q_rank)  # q_a_proj, q_a_layernorm
            + sizer.linear(q_rank, heads * (nope + rope))  # q_b_proj
            + sizer.linear(hidden, kv_rank + rope)
            + sizer.vector(kv_rank)  # kv_a_proj_with_mqa, norm
            + sizer.linear(kv_rank, heads * (nope + v_dim))  # kv_b_proj (embed_q + unembed_out)
            + sizer.linear(heads * v_dim, hidden)  # o_proj
        )
        # mlx-lm caches the latent (kv_rank) and the shared rope key; decode attends in latent
        # space: scores over kv_rank + rope, values over kv_rank, for every head.
        return weights, 2.0 * heads * (2 * kv_rank + rope), (kv_rank + rope) * FLOAT16_BYTES
    kv_heads = _int(text, "num_key_value_heads", heads)
    head_dim = _int(text, "head_dim", hidden // heads)
    weights = (
        sizer.linear(hidden, heads * head_dim)
        + sizer.linear(hidden, kv_heads * head_dim).times(2)
        + sizer.linear(heads * head_dim, hidden)
    )
    if architecture == "qwen3_moe":
        weights = weights + sizer.vector(head_dim).times(2)  # q_norm, k_norm
    # (llama4's qk norm is a weightless L2 norm)
    return weights, 4.0 * heads * head_dim, 2 * kv_heads * head_dim * FLOAT16_BYTES


def _moe_block(sizer: _Sizer, architecture: str, text: dict[str, Any]) -> tuple[_Part, _Part, _Part, int]:
    """(one routed expert, shared experts, router, number of routed experts) of a MoE layer."""
    hidden = _int(text, "hidden_size")
    if architecture == "llama4":
        experts = _int(text, "num_local_experts")
        expert = sizer.mlp(hidden, _int(text, "intermediate_size"))
        return expert, expert, sizer.vector(experts * hidden), experts  # one shared expert, same width
    if architecture == "mixtral":
        experts = _int(text, "num_local_experts")
        return (
            sizer.mlp(hidden, _int(text, "intermediate_size")),
            _Part(),
            sizer.vector(experts * hidden),
            experts,
        )
    if architecture == "qwen3_moe":
        experts = _int(text, "num_experts")
        return (
            sizer.mlp(hidden, _int(text, "moe_intermediate_size")),
            _Part(),
            sizer.vector(experts * hidden),
            experts,
        )
    experts, width = _int(text, "n_routed_experts"), _int(text, "moe_intermediate_size")
    shared = sizer.mlp(hidden, width * _int(text, "n_shared_experts", 0))
    # router weight plus its score-correction bias (float32 in the checkpoint)
    router = sizer.vector(experts * hidden) + _Part(experts, experts * 4)
    return sizer.mlp(hidden, width), shared, router, experts


def _dense_width(architecture: str, text: dict[str, Any]) -> int:
    if architecture == "llama4":
        return _int(text, "intermediate_size_mlp", _int(text, "intermediate_size"))
    return _int(text, "intermediate_size")


def _attention_windows(architecture: str, text: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    if architecture != "llama4" or not text.get("attention_chunk_size"):
        return (0,) * num_layers
    # llama4: RoPE layers (no_rope_layers[i] == 1) attend within chunks; NoPE layers see it all.
    chunk = _int(text, "attention_chunk_size")
    uses_rope = text.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(num_layers)]
    return tuple(chunk if uses_rope[i] else 0 for i in range(num_layers))


def shape_from_config(
    config: dict[str, Any], bits: int = 4, group_size: int = 64, name: str = "", path: Path | None = None
) -> ModelShape:
    """The shape of the model `config` (a config.json as a dict) quantized to `bits` per weight."""
    architecture = config.get("model_type")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"cannot simulate model_type {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if bits not in (2, 3, 4, 5, 6, 8, 16) or group_size < 1:
        raise ModelError(f"unsupported quantization: {bits} bits, group size {group_size}")
    text = _text_config(config)
    hidden, num_layers, vocab = (_int(text, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
    top_k = _int(text, "num_experts_per_tok", 0)
    sizer = _Sizer(bits, group_size)
    attention, attention_flops, kv_bytes = _attention(sizer, architecture, text)
    norms = sizer.vector(hidden).times(2)  # input_layernorm, post_attention_layernorm
    moe = _moe_layers(architecture, text, num_layers)
    dense_mlp = sizer.mlp(hidden, _dense_width(architecture, text))

    layer_bytes, decode_bytes, flops, expert_flops, expert_bytes = [], [], [], [], []
    total = active = 0
    num_experts = 0
    for layer in range(num_layers):
        base = attention + norms
        if layer in moe:
            expert, shared, router, num_experts = _moe_block(sizer, architecture, text)
            whole = base + shared + router + expert.times(num_experts)
            used = base + shared + router + expert.times(top_k)
            expert_bytes.append(expert.num_bytes)
            expert_flops.append(2.0 * expert.params)
        else:
            whole = used = base + dense_mlp
            expert_bytes.append(0)
            expert_flops.append(0.0)
        layer_bytes.append(whole.num_bytes)
        decode_bytes.append(used.num_bytes)
        flops.append(2.0 * used.params)  # one multiply-add per weight a token touches
        total += whole.params
        active += used.params

    embed = sizer.linear(hidden, vocab)  # quantized like a Linear (QuantizedEmbedding)
    tied = bool(text.get("tie_word_embeddings", architecture == "llama"))
    head = sizer.vector(hidden) + (embed if tied else sizer.linear(hidden, vocab))
    total += embed.params + (0 if tied else embed.params) + hidden
    active += embed.params + (0 if tied else embed.params) + hidden
    moe_layers = tuple(sorted(moe))
    info_fields = dict(
        path=path or Path(f"{name or architecture}.json"),
        format="mlx",
        architecture=architecture,
        num_layers=num_layers,
        context_length=_int(text, "max_position_embeddings", 4096),
        layer_bytes=tuple(layer_bytes),
        embed_bytes=embed.num_bytes,
        head_bytes=head.num_bytes,
        tied_embeddings=tied,
        num_experts=num_experts if moe_layers else 0,
        moe_layers=moe_layers,
        expert_bytes=tuple(expert_bytes) if moe_layers else (),
    )
    # Newer ModelInfo versions also carry these; fill them where the dataclass has them.
    optional = {
        "hidden_size": hidden,
        "experts_per_token": top_k if moe_layers else 0,
        "kv_bytes_per_token": kv_bytes,
    }
    known = {field.name for field in dataclasses.fields(ModelInfo)}
    info_fields.update({key: value for key, value in optional.items() if key in known})
    return ModelShape(
        name=name or architecture,
        info=ModelInfo(**info_fields),
        hidden_size=hidden,
        experts_per_token=top_k if moe_layers else 0,
        bits=bits,
        group_size=group_size,
        layer_flops_per_token=tuple(flops),
        layer_decode_bytes=tuple(decode_bytes),
        expert_flops_per_token=tuple(expert_flops),
        attention_flops_per_context_token=(attention_flops,) * num_layers,
        kv_bytes_per_token_layer=(kv_bytes,) * num_layers,
        attention_window=_attention_windows(architecture, text, num_layers),
        embed_decode_bytes=embed.num_bytes // vocab,
        head_flops_per_token=2.0 * hidden * vocab,
        total_params=total,
        active_params=active,
    )


# --- built-in shapes -----------------------------------------------------------------------------


def _models_dir() -> Any:
    return resources.files("pomona").joinpath("data", "models")


def builtin_model_names() -> list[str]:
    return sorted(
        entry.name[: -len(".json")] for entry in _models_dir().iterdir() if entry.name.endswith(".json")
    )


def builtin_config(name: str) -> dict[str, Any]:
    """The stored config.json (with its `pomona` section) of built-in model `name`."""
    known = builtin_model_names()
    if name not in known:
        raise ModelError(f"unknown built-in model {name!r}; known models: {', '.join(known)}")
    return json.loads(_models_dir().joinpath(f"{name}.json").read_text(encoding="utf-8"))


def builtin_model(name: str, bits: int | None = None) -> ModelShape:
    """Built-in model `name` at its stored quantization (or at `bits` per weight)."""
    config = builtin_config(name)
    quantization = config.get("pomona", {}).get("quantization", {})
    return shape_from_config(
        config,
        bits=bits if bits is not None else int(quantization.get("bits", 4)),
        group_size=int(quantization.get("group_size", 64)),
        name=name,
        path=Path(str(_models_dir().joinpath(f"{name}.json"))),
    )
