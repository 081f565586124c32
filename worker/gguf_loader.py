"""GGUF checkpoints -> mlx-lm models: the config, parameter names and quantization of each
architecture, and only the tensors a stage keeps, each read by offset (``worker.gguf_tensors``).

Architectures (``general.architecture``): ``llama`` (Mixtral too: llama.cpp files it as llama with
``llama.expert_count``), ``qwen2``, ``qwen3``, ``qwen2moe``, ``qwen3moe``. Each is built with
mlx-lm's own class for the family (llama, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe) from a
config.json-style dict derived from the metadata. Quantization is per module, from each tensor's
GGML type (SmolLM2's token embedding is Q8_0, the rest Q4_1).

The q/k choice for llama: llama.cpp's converter permutes q/k rows for its GPT-J style rope; we
*undo* it and build with ``rope_traditional=False``, so that weights from a GGUF and from an
HF/mlx-lm checkpoint have the same layout and the same model code serves both. (Keeping raw q/k
with ``rope_traditional=True`` gives identical tokens, per DESIGN.md section 2.) Qwen files are not
permuted (their rope is already the NeoX layout mlx-lm uses).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import _get_classes

from pomona.errors import ModelError
from pomona.gguf_header import GgufHeader, GgufTensor, read_gguf_header

from .gguf_tensors import GROUP_SIZE, QUANTIZED_BITS, read_tensor

# GGUF architecture -> mlx-lm model_type (llama with experts becomes mixtral).
SUPPORTED_ARCHITECTURES = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
}  # fmt: skip
_PERMUTED_QK = ("llama", "mixtral")  # model types whose GGUF converter permutes q/k rows

# llama.cpp tensor names (without "blk.N.") -> mlx-lm module names; {moe} is the MoE block.
_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "{moe}.gate",
    "ffn_gate_exps": "{moe}.switch_mlp.gate_proj",
    "ffn_up_exps": "{moe}.switch_mlp.up_proj",
    "ffn_down_exps": "{moe}.switch_mlp.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GLOBAL_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(\w+)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(\w+)")


@dataclass
class GgufCheckpoint:
    """A GGUF model in mlx-lm terms, ready for ``nn.quantize`` + ``load_weights``.

    ``quantization`` covers every quantized module of the file, kept or not (it comes from the
    header only), so a stage can quantize its skeleton the same way whatever it loaded.
    ``complete`` is False when ``keep`` dropped any tensor.
    """

    config: dict[str, Any]
    weights: dict[str, mx.array]
    quantization: dict[str, dict[str, int]] = field(default_factory=dict)
    complete: bool = True


@dataclass(frozen=True)
class GgufLayout:
    """What the header alone says: the mlx-lm config, each tensor's mlx-lm module name, and the
    quantization of each module."""

    header: GgufHeader
    config: dict[str, Any]
    modules: dict[str, str]  # GGUF tensor name -> mlx-lm parameter name ("...q_proj.weight")
    quantization: dict[str, dict[str, int]]

    def skeleton(self) -> nn.Module:
        """The mlx-lm model of the file's family, unquantized, its random init lazy."""
        model_class, args_class = _get_classes(self.config)
        return model_class(args_class.from_dict(self.config))

    def build(self) -> nn.Module:
        """The skeleton quantized module by module like the file."""
        model, quantization = self.skeleton(), self.quantization
        nn.quantize(model, class_predicate=lambda path, _module: quantization.get(path, False))
        return model


def read_layout(path: Path) -> GgufLayout:
    """The layout of the GGUF at ``path`` from its header; ModelError for what it cannot serve."""
    header = read_gguf_header(path, skip_arrays=True)
    metadata = header.metadata
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"GGUF architecture {architecture!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); a checkpoint directory of "
            "the model (mlx_lm.convert) serves any mlx-lm family"
        )
    tensors = {t.name: t for t in header.tensors}
    if "rope_freqs.weight" in tensors:
        # Llama 3.1+ stores its rope scaling as per-frequency factors; mlx-lm wants the
        # rope_scaling parameters those came from, which the GGUF does not keep.
        raise ModelError(f"{path}: llama3-style rope frequency factors are not supported yet")
    if any(re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight", name) for name in tensors):
        raise ModelError(
            f"{path} stores each expert as its own tensor (an older llama.cpp conversion); "
            "convert the model again so that experts are stacked (ffn_*_exps)"
        )
    config = gguf_config(metadata, tensors)
    moe = "block_sparse_moe" if config["model_type"] == "mixtral" else "mlp"
    modules = {name: _mlx_name(name, moe) for name in tensors}
    quantization = {
        modules[name].removesuffix(".weight"): {"group_size": GROUP_SIZE, "bits": bits}
        for name, t in tensors.items() if (bits := QUANTIZED_BITS.get(t.ggml_type))
    }  # fmt: skip
    return GgufLayout(header, config, modules, quantization)


def load_gguf(
    path: Path, keep: Callable[[str], bool] | None = None, layout: GgufLayout | None = None
) -> GgufCheckpoint:
    """Read a GGUF file into mlx-lm names; ``keep(mlx_name)`` selects the tensors to read (the
    others are never read from disk). ``layout``: the file's, when the caller has read it."""
    layout = layout or read_layout(Path(path))
    config = layout.config
    permuted = config["model_type"] in _PERMUTED_QK
    weights: dict[str, mx.array] = {}
    tensors = layout.header.tensors
    fd = os.open(path, os.O_RDONLY)
    try:
        for tensor in tensors:
            module = layout.modules[tensor.name].removesuffix(".weight").removesuffix(".bias")
            suffix = layout.modules[tensor.name].rpartition(".")[2]
            for part, array in _read_parts(fd, tensor, module, suffix, keep).items():
                weights[part] = _unpermute_qk(part, array, config) if permuted else array
    except OSError as error:
        raise ModelError(f"cannot read GGUF {path}: {error}") from error
    finally:
        os.close(fd)
    expected = sum(3 if t.ggml_type in QUANTIZED_BITS else 1 for t in tensors)
    return GgufCheckpoint(config, weights, layout.quantization, complete=len(weights) == expected)


def _read_parts(fd: int, tensor: GgufTensor, module: str, suffix: str, keep) -> dict[str, mx.array]:
    if suffix != "weight":  # a bias vector: one float array
        name = f"{module}.{suffix}"
        return {name: read_tensor(fd, tensor)["weight"]} if keep is None or keep(name) else {}
    names = {"weight": f"{module}.weight", "scales": f"{module}.scales", "biases": f"{module}.biases"}
    if keep is not None and not keep(names["weight"]):
        return {}
    return {names[part]: array for part, array in read_tensor(fd, tensor).items()}


def gguf_config(metadata: dict[str, Any], tensors: dict[str, GgufTensor]) -> dict[str, Any]:
    """A config.json-style dict for the mlx-lm family of the file's architecture."""
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}")
        return default if value is None else value

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    config: dict[str, Any] = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "hidden_size": hidden_size,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length", 0)),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": int(get("attention.key_length", hidden_size // num_heads)),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "rope_traditional": False,  # q/k are un-permuted on load, see the module docstring
        # The embedding's row count is authoritative: metadata vocab_size is optional.
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    experts = int(get("expert_count", 0))
    if experts:
        top_k = int(get("expert_used_count", 0))
        if top_k < 1:
            raise ModelError(f"the GGUF has {experts} experts per layer but no {arch}.expert_used_count")
        expert_width = int(get("expert_feed_forward_length", config["intermediate_size"]))
        if arch == "llama":  # Mixtral: every layer MoE, experts as wide as the dense FFN
            config.update(model_type="mixtral", num_local_experts=experts, num_experts_per_tok=top_k,
                          intermediate_size=expert_width)  # fmt: skip
        else:
            config.update(num_experts=experts, num_experts_per_tok=top_k,
                          moe_intermediate_size=expert_width)  # fmt: skip
        if arch == "qwen2moe":
            config["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
        if arch == "qwen3moe":
            # llama.cpp normalizes Qwen3-MoE's top-k weights (norm_w) and every layer is MoE.
            config.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ModelError(f"GGUF rope scaling {scaling_type!r} is not supported")
    return config


def build_model(checkpoint: GgufCheckpoint) -> nn.Module:
    """The whole mlx-lm model for a checkpoint (single process: tests and benchmarks)."""
    model_class, args_class = _get_classes(checkpoint.config)
    model = model_class(args_class.from_dict(checkpoint.config))
    quantization = checkpoint.quantization
    nn.quantize(model, class_predicate=lambda path, _module: quantization.get(path, False))
    model.load_weights(list(checkpoint.weights.items()), strict=checkpoint.complete)
    model.eval()
    mx.eval(model.parameters())
    return model


def _float32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _mlx_name(gguf_name: str, moe: str = "mlp") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    layer = _LAYER_TENSOR.fullmatch(gguf_name)
    if layer is not None:
        index, module, suffix = layer.groups()
        if module in _LAYER_MODULES:
            return f"model.layers.{index}.{_LAYER_MODULES[module].format(moe=moe)}.{suffix}"
    else:
        top = _GLOBAL_TENSOR.fullmatch(gguf_name)
        if top is not None and top.group(1) in _GLOBAL_MODULES:
            return f"{_GLOBAL_MODULES[top.group(1)]}.{top.group(2)}"
    raise ModelError(f"GGUF tensor {gguf_name!r} has no mlx-lm equivalent")


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


class GgufExpertIndex:
    """Rows (experts) of a GGUF's stacked expert tensors, read by offset: the expert-parallel
    counterpart of ``worker.experts.SafetensorsIndex`` (same ``read_rows``)."""

    def __init__(self, path: Path, layout: GgufLayout):
        self.path = path
        # mlx-lm module name ("model.layers.1.mlp.switch_mlp.gate_proj") -> its GGUF tensor
        self._tensors = {layout.modules[t.name].rpartition(".")[0]: t for t in layout.header.tensors}
        self._last: tuple[str, tuple[int, ...], dict[str, mx.array]] | None = None

    def read_rows(self, name: str, rows: list[int]) -> mx.array:
        """Rows (along axis 0) of ``name`` (".weight", ".scales" or ".biases" of a module)."""
        module, _, part = name.rpartition(".")
        if module not in self._tensors:
            raise ModelError(f"{self.path} has no tensor for {name}")
        # weight, scales and biases of one module come from the same bytes: read them once.
        if self._last is None or self._last[:2] != (module, tuple(rows)):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                self._last = module, tuple(rows), read_tensor(fd, self._tensors[module], rows)
            finally:
                os.close(fd)
        return self._last[2][part]
