"""GGUF files for the tests, and an oracle for GGUF models that shares nothing with Pomona's loader.

`write_gguf` turns a tiny mlx-lm checkpoint (tests/tiny_models.py) into a GGUF as llama.cpp's
converter lays it out: llama.cpp tensor names (from the ``gguf`` package's own name map), q/k rows
permuted for the llama architecture, weights quantized with ``gguf.quants``, the byte-level BPE
tokenizer as metadata.

`dequantized_checkpoint` goes the other way with the ``gguf`` package only (``GGUFReader``,
``gguf.quants.dequantize``, its name map): every tensor dequantized to float32, q/k rows put back,
saved as an mlx-lm checkpoint directory that ``mlx_lm.utils.load_model`` loads. Single-process
mlx-lm on that directory is the reference for Pomona's own GGUF path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from tokenizers import Tokenizer

# mlx-lm model_type -> GGUF architecture.
ARCHITECTURES = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}  # fmt: skip
# mlx-lm's stacked experts under the Hugging Face names the gguf package's map knows.
_EXPERT_NAMES = {
    "mixtral": {"switch_mlp.gate_proj": "experts.w1", "switch_mlp.down_proj": "experts.w2",
                "switch_mlp.up_proj": "experts.w3"},  # fmt: skip
    "default": {"switch_mlp.": "experts."},
}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute() of q/k rows, for its GPT-J style rope."""
    split = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    split = weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def gguf_names(config: dict[str, Any]) -> dict[str, str]:
    """mlx-lm parameter name -> GGUF tensor name, for every float parameter of the family."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCHITECTURES[config["model_type"]])
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    renames = _EXPERT_NAMES.get(config["model_type"], _EXPERT_NAMES["default"])
    names = {}
    for name, _ in tree_flatten(model.parameters()):
        hf_name = name
        for old, new in renames.items():
            hf_name = hf_name.replace(old, new)
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"the gguf package maps no tensor to {hf_name}")
        names[name] = mapped
    return names


def write_gguf(checkpoint: Path, path: Path, qtype: Q = Q.F32) -> Path:
    """A GGUF of the tiny mlx-lm checkpoint at ``checkpoint``; matrices stored as ``qtype``."""
    config = json.loads((checkpoint / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]]
    stored = mx.load(str(checkpoint / "model.safetensors"))
    weights = {name: np.array(value.astype(mx.float32)) for name, value in stored.items()}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_context_length(config["max_position_embeddings"])
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if "shared_expert_intermediate_size" in config:
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    _add_tokenizer(writer, checkpoint)
    for name, gguf_name in gguf_names(config).items():
        array = weights[name]
        if arch == "llama" and ".q_proj." in name:
            array = _permute(array, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = _permute(array, config["num_key_value_heads"])
        kind = qtype if array.ndim >= 2 and array.shape[-1] % 32 == 0 and ".gate." not in name else Q.F32
        if kind == Q.F32:
            writer.add_tensor(gguf_name, array)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Path) -> None:
    """The tiny byte-level BPE tokenizer as llama.cpp's converter stores a "gpt2" vocabulary."""
    state = json.loads(Tokenizer.from_file(str(checkpoint / "tokenizer.json")).to_str())
    vocab = state["model"]["vocab"]
    for added in state["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in state["added_tokens"] if added["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    writer.add_chat_template(tokenizer_config["chat_template"])


def dequantized_checkpoint(gguf_path: Path, config: dict[str, Any], out_dir: Path) -> Path:
    """The GGUF's weights, dequantized by the gguf package, as an mlx-lm checkpoint directory."""
    reader = gguf.GGUFReader(str(gguf_path))
    by_gguf = {g: m for m, g in gguf_names(config).items()}
    arch = ARCHITECTURES[config["model_type"]]
    weights = {}
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            if tensor.name == "output.weight" and config.get("tie_word_embeddings"):
                continue
            raise ValueError(f"{gguf_path}: no mlx-lm parameter for {tensor.name}")
        shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists ne0 first
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        name = by_gguf[tensor.name]
        if arch == "llama" and ".q_proj." in name:
            array = _unpermute(array, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = _unpermute(array, config["num_key_value_heads"])
        weights[name] = mx.array(array)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization"}))
    return out_dir


def llama_config(gguf_path: Path) -> dict[str, Any]:
    """mlx-lm's llama config of a llama-architecture GGUF, read with the gguf package."""
    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str) -> Any:
        return reader.fields[f"llama.{key}"].contents()

    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    heads = field("attention.head_count")
    return {
        "model_type": "llama",
        "hidden_size": field("embedding_length"),
        "num_hidden_layers": field("block_count"),
        "intermediate_size": field("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": field("attention.head_count_kv"),
        "head_dim": field("embedding_length") // heads,
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_theta": field("rope.freq_base"),
        "vocab_size": int(embedding.shape[1]),
        "max_position_embeddings": field("context_length"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
