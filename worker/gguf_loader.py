"""GGUF checkpoints -> mlx-lm parameter names, config and per-module quantization.

``mx.load`` reads GGUF natively: Q4_0/Q4_1/Q8_0 tensors arrive already in MLX's affine
quantized layout (packed uint32 ``weight`` + ``scales`` + ``biases``), so no dequantization is
needed. What is left is (1) renaming llama.cpp's tensors to mlx-lm's, (2) deriving a
config.json-style dict from the metadata, (3) inferring each module's bits and group size from
its packed shapes (they differ per module: SmolLM2's token embedding is Q8_0, the rest Q4_1), and
(4) undoing llama.cpp's q/k row permutation.

The q/k choice: we *undo* the permutation and build mlx-lm's llama with
``rope_traditional=False``, so that weights from a GGUF and from an HF/mlx-lm safetensors
checkpoint have the same layout and the same model code serves both. (Keeping raw q/k with
``rope_traditional=True`` gives identical tokens, per DESIGN.md section 2.)

Only the llama architecture is supported for now.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama

from pomona.errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor names (without the "blk.N." prefix) -> mlx-lm module names.
_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(\w+)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(\w+)")
# Bit widths and group sizes MLX's affine quantization supports.
_VALID_BITS = (2, 3, 4, 5, 6, 8)
_VALID_GROUP_SIZES = (32, 64, 128)


@dataclass
class GgufCheckpoint:
    """A GGUF model in mlx-lm terms, ready for ``nn.quantize`` + ``load_weights``.

    ``quantization`` covers every quantized module of the file, kept or not (it is derived from
    shapes only), so a stage can quantize its skeleton the same way whatever it loaded.
    ``complete`` is False when ``keep`` dropped any tensor.
    """

    config: dict[str, Any]
    weights: dict[str, mx.array]
    quantization: dict[str, dict[str, int]] = field(default_factory=dict)
    complete: bool = True


def load_gguf(path: Path, keep: Callable[[str], bool] | None = None) -> GgufCheckpoint:
    """Read a GGUF file into mlx-lm names; ``keep(mlx_name)`` selects the tensors to return."""
    try:
        raw, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as error:
        raise ModelError(f"cannot load GGUF {path}: {error}") from error
    architecture = _metadata_value(metadata, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if "rope_freqs.weight" in raw:
        # Llama 3.1+ stores its rope scaling as per-frequency factors; mlx-lm wants the
        # rope_scaling parameters those came from, which the GGUF does not keep.
        raise ModelError(f"{path}: llama3-style rope frequency factors are not supported yet")
    config = gguf_llama_config(metadata, raw)
    quantization = _infer_quantization(raw, config)

    weights: dict[str, mx.array] = {}
    tensor_count = len(raw)
    for gguf_name in list(raw):
        array = raw.pop(gguf_name)  # drop our reference so rejected tensors can be freed now
        name = _mlx_name(gguf_name)
        if keep is not None and not keep(name):
            continue
        weights[name] = _unpermute_qk(name, array, config)
    return GgufCheckpoint(
        config=config,
        weights=weights,
        quantization=quantization,
        complete=len(weights) == tensor_count,
    )


def gguf_llama_config(metadata: dict[str, Any], tensors: dict[str, mx.array]) -> dict[str, Any]:
    """A config.json-style dict for ``mlx_lm.models.llama.ModelArgs.from_dict``."""
    def get(key: str, default: Any = None) -> Any:
        value = _metadata_value(metadata, f"llama.{key}")
        return default if value is None else value

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    embedding = tensors["token_embd.scales" if "token_embd.scales" in tensors
                        else "token_embd.weight"]
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": int(get("attention.key_length", hidden_size // num_heads)),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "rope_traditional": False,  # q/k are un-permuted on load, see the module docstring
        # The embedding's row count is authoritative: metadata vocab_size is optional.
        "vocab_size": int(embedding.shape[0]),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
    }
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ModelError(f"GGUF rope scaling {scaling_type!r} is not supported")
    return config


def build_model(checkpoint: GgufCheckpoint) -> nn.Module:
    """The whole mlx-lm llama model for a checkpoint (single process; tests and the oracle)."""
    model = llama.Model(llama.ModelArgs.from_dict(checkpoint.config))
    quantization = checkpoint.quantization
    nn.quantize(model, class_predicate=lambda path, _module: quantization.get(path, False))
    model.load_weights(list(checkpoint.weights.items()), strict=checkpoint.complete)
    model.eval()
    mx.eval(model.parameters())
    return model


def _float32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _metadata_value(metadata: dict[str, Any], key: str) -> Any:
    """A metadata entry as a plain Python value (mx.load gives scalars as 0-d arrays)."""
    value = metadata.get(key)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _mlx_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    layer = _LAYER_TENSOR.fullmatch(gguf_name)
    if layer is not None:
        index, module, suffix = layer.groups()
        if module in _LAYER_MODULES:
            return f"model.layers.{index}.{_LAYER_MODULES[module]}.{suffix}"
    else:
        top = _GLOBAL_TENSOR.fullmatch(gguf_name)
        if top is not None and top.group(1) in _GLOBAL_MODULES:
            return f"{_GLOBAL_MODULES[top.group(1)]}.{top.group(2)}"
    raise ModelError(f"GGUF tensor {gguf_name!r} has no mlx-lm llama equivalent")


def _unpermute_qk(name: str, array: mx.array, config: dict[str, Any]) -> mx.array:
    """Undo llama.cpp's rope row permutation of q_proj/k_proj.

    llama.cpp's converter reorders each head's output rows from [first half | second half] to
    interleaved pairs (``reshape(heads, 2, rows/heads/2, ...).swapaxes(1, 2)``) for its GPT-J
    style rope. It only moves whole output rows, so the same inverse applies to packed weights,
    scales, biases and bias vectors alike.
    """
    if ".self_attn.q_proj." in name:
        heads = config["num_attention_heads"]
    elif ".self_attn.k_proj." in name:
        heads = config["num_key_value_heads"]
    else:
        return array
    rows, rest = array.shape[0], array.shape[1:]
    return (
        array.reshape(heads, rows // heads // 2, 2, *rest)
        .swapaxes(1, 2)
        .reshape(array.shape)
    )


def _infer_quantization(
    tensors: dict[str, mx.array], config: dict[str, Any]
) -> dict[str, dict[str, int]]:
    """Bits and group size of every quantized module, from its packed shapes.

    A packed row holds ``in_features * bits / 32`` uint32 words and ``in_features / group_size``
    scales, so both follow once ``in_features`` is known; it comes from the config because the
    shapes alone are ambiguous (4-bit group 32 and 8-bit group 64 of twice the width look alike).
    """
    attention_width = config["num_attention_heads"] * config["head_dim"]
    quantization: dict[str, dict[str, int]] = {}
    for gguf_name, scales in tensors.items():
        if not gguf_name.endswith(".scales"):
            continue
        module = _mlx_name(gguf_name).removesuffix(".scales")
        if module.endswith("mlp.down_proj"):
            in_features = config["intermediate_size"]
        elif module.endswith("self_attn.o_proj"):
            in_features = attention_width
        else:
            in_features = config["hidden_size"]
        packed = tensors[gguf_name.removesuffix(".scales") + ".weight"]
        bits, bits_rest = divmod(packed.shape[-1] * 32, in_features)
        group_size, group_rest = divmod(in_features, scales.shape[-1])
        valid = bits in _VALID_BITS and group_size in _VALID_GROUP_SIZES
        if bits_rest or group_rest or not valid:
            raise ModelError(
                f"cannot infer the quantization of {gguf_name}: packed {tuple(packed.shape)}, "
                f"scales {tuple(scales.shape)}, in_features {in_features}"
            )
        quantization[module] = {"group_size": group_size, "bits": bits}
    return quantization

