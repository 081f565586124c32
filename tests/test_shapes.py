"""Built-in model shapes: byte totals and parameter counts against published figures."""

from __future__ import annotations

import pytest

from pomona.errors import ModelError
from pomona.shapes import builtin_config, builtin_model, builtin_model_names, shape_from_config

BITS_PER_WEIGHT = 4.5  # mlx 4-bit, group 64: 4 bits + a 16-bit scale and bias per 64 weights

# name, published 4-bit size (bytes; None: none published in the stored sources), tolerance
SIZES = [
    ("llama-3.3-70b", 40e9, 0.02),  # mlx-community 4-bit ~40 GB
    ("deepseek-v3", 378e9, 0.02),  # ~378 GB
    ("qwen3-235b-a22b", 132e9, 0.02),  # ~132 GB
    ("llama-4-scout", 61e9, 0.03),  # ~61 GB incl. the vision tower, which we do not count
    ("llama-4-maverick", None, 0.02),
    ("mixtral-8x22b", None, 0.02),
]

# name, published total and active parameters, tolerance
PARAMS = [
    ("llama-3.3-70b", 70.55e9, 70.55e9, 0.001),
    ("deepseek-v3", 671e9, 37e9, 0.02),  # active: 37.5B counted (embedding + head included)
    ("qwen3-235b-a22b", 235e9, 22e9, 0.01),
    ("llama-4-scout", 109e9, 17e9, 0.02),  # 109B counts the vision tower (~1.9B)
    ("llama-4-maverick", 400e9, 17e9, 0.02),
    ("mixtral-8x22b", 141e9, 39e9, 0.01),
]


def test_all_six_models_are_built_in() -> None:
    assert {row[0] for row in SIZES} <= set(builtin_model_names())


@pytest.mark.parametrize(("name", "published", "tolerance"), SIZES)
def test_byte_total_matches_published_size(name: str, published: float | None, tolerance: float) -> None:
    shape = builtin_model(name)
    expected = published or shape.total_params * BITS_PER_WEIGHT / 8
    assert shape.info.total_bytes == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize(("name", "total", "active", "tolerance"), PARAMS)
def test_parameter_counts_match_model_cards(name: str, total: float, active: float, tolerance: float) -> None:
    shape = builtin_model(name)
    assert shape.total_params == pytest.approx(total, rel=tolerance)
    assert shape.active_params == pytest.approx(active, rel=tolerance)


def test_llama_3_70b_is_exact() -> None:
    assert builtin_model("llama-3.3-70b").total_params == 70_553_706_496


@pytest.mark.parametrize(
    ("name", "experts", "moe_layers", "top_k"),
    [
        ("llama-4-scout", 16, 48, 1),
        ("llama-4-maverick", 128, 24, 1),
        ("deepseek-v3", 256, 58, 8),
        ("qwen3-235b-a22b", 128, 94, 8),
        ("mixtral-8x22b", 8, 56, 2),
        ("llama-3.3-70b", 0, 0, 0),
    ],
)
def test_moe_structure(name: str, experts: int, moe_layers: int, top_k: int) -> None:
    shape = builtin_model(name)
    assert shape.info.num_experts == experts
    assert len(shape.info.moe_layers) == moe_layers
    assert shape.experts_per_token == top_k


def test_maverick_alternates_dense_and_moe_layers() -> None:
    info = builtin_model("llama-4-maverick").info
    assert info.moe_layers == tuple(range(1, 48, 2))
    assert info.expert_bytes[0] == 0 and info.expert_bytes[1] > 0


def test_layer_bytes_split_into_experts_and_the_rest() -> None:
    shape = builtin_model("deepseek-v3")
    info = shape.info
    assert info.moe_layers[0] == 3  # first_k_dense_replace
    layer = info.moe_layers[0]
    non_expert = info.non_expert_bytes(layer)
    assert shape.layer_decode_bytes[layer] == non_expert + 8 * info.expert_bytes[layer]
    # one routed expert: 3 x 7168 x 2048 weights at 4.5 bits
    assert info.expert_bytes[layer] == 3 * 7168 * 2048 * 9 // 16


@pytest.mark.parametrize(
    ("name", "kv_bytes_per_token_layer"),
    [
        ("llama-3.3-70b", 2 * 8 * 128 * 2),  # k and v, 8 kv heads x 128, float16
        ("deepseek-v3", (512 + 64) * 2),  # MLA latent + rope key
        ("qwen3-235b-a22b", 2 * 4 * 128 * 2),
    ],
)
def test_kv_cache_bytes(name: str, kv_bytes_per_token_layer: int) -> None:
    shape = builtin_model(name)
    assert shape.kv_bytes_per_token == kv_bytes_per_token_layer * shape.num_layers


def test_scout_chunked_attention_on_rope_layers_only() -> None:
    shape = builtin_model("llama-4-scout")
    assert shape.attended_tokens(0, 100_000) == 8192
    assert shape.attended_tokens(3, 100_000) == 100_000  # NoPE layer: global attention


def test_every_model_records_its_source_and_quantization() -> None:
    for name in builtin_model_names():
        section = builtin_config(name)["pomona"]
        assert section["config_source"].startswith("https://huggingface.co/")
        assert section["quantization"]["bits"] == 4 and section["quantization"]["group_size"] == 64


def test_eight_bit_is_bigger() -> None:
    assert (
        builtin_model("mixtral-8x22b", bits=8).info.total_bytes
        > builtin_model("mixtral-8x22b").info.total_bytes
    )


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match="unknown built-in model 'llama-5'.*deepseek-v3.*mixtral-8x22b"):
        builtin_model("llama-5")


def test_unsupported_family() -> None:
    with pytest.raises(ModelError, match="cannot simulate model_type 'gpt2'"):
        shape_from_config({"model_type": "gpt2"})
