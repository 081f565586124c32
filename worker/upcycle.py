"""Sparse upcycling: a Mixtral-format MoE checkpoint built from a dense llama GGUF.

Every layer's dense MLP becomes ``num_experts`` experts that start as copies of it, behind a
random router that picks ``top_k`` of them per token (Komatsuzaki et al., 2022). With no noise
all experts are the same function and the router's top-k softmax weights sum to one, so the MoE
model computes exactly what the dense model does; with noise each copy differs a little, so the
router's choices matter and tokens spread over the experts. Either way the output is a real
checkpoint directory that mlx-lm's ``load_model`` reads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json), which is what expert parallelism needs and what the demo
shows without any download beyond the default model.

The quantized tensors are copied as they are (packed weights, scales, biases): no dequantization,
so the experts are bit-for-bit the dense MLP's and the checkpoint keeps its 4-bit size.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

from pomona.errors import ModelError
from pomona.tokenizer import load_tokenizer

from .gguf_loader import load_gguf

ROUTER_STD = 0.02  # small, like a freshly initialized linear layer: routing starts near uniform
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Sizes that mean the same in mlx-lm's llama and mixtral ModelArgs.
_SHARED_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_traditional", "rope_scaling",
    "vocab_size", "max_position_embeddings", "tie_word_embeddings",
)  # fmt: skip


def upcycle(
    gguf_path: Path,
    out_dir: Path,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    noise: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a Mixtral-format MoE version of the llama GGUF at ``gguf_path`` into ``out_dir``.

    ``noise`` is the standard deviation of a relative perturbation applied to each expert copy
    (per quantization group); ``seed`` fixes it and the router. Returns ``out_dir``.
    """
    if not 1 <= top_k <= num_experts:
        raise ModelError(f"top_k must be between 1 and num_experts ({num_experts}), not {top_k}")
    if noise < 0:
        raise ModelError(f"noise must be >= 0, not {noise}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    checkpoint = load_gguf(gguf_path)
    if checkpoint.config["model_type"] != "llama":
        raise ModelError(
            f"upcycling needs a dense llama GGUF; {gguf_path} is {checkpoint.config['model_type']}"
        )
    config = mixtral_config(checkpoint.config, checkpoint.quantization, num_experts, top_k)
    tokenizer = load_tokenizer(gguf_path)

    weights = {name: array for name, array in checkpoint.weights.items() if ".mlp." not in name}
    layer_keys = mx.random.split(mx.random.key(seed), config["num_hidden_layers"])
    for layer in range(config["num_hidden_layers"]):
        router_key, *projection_keys = mx.random.split(layer_keys[layer], 1 + len(_PROJECTIONS))
        moe = f"model.layers.{layer}.block_sparse_moe"
        # float32 and never quantized: mlx-lm quantizes only modules whose .scales it finds.
        weights[f"{moe}.gate.weight"] = ROUTER_STD * mx.random.normal(
            (num_experts, config["hidden_size"]), key=router_key
        )
        for projection, key in zip(_PROJECTIONS, projection_keys, strict=True):
            dense = f"model.layers.{layer}.mlp.{projection}"
            experts = _stacked_experts(checkpoint.weights, dense, num_experts, noise, key)
            for suffix, array in experts.items():
                weights[f"{moe}.switch_mlp.{projection}.{suffix}"] = array

    out_dir.mkdir(parents=True, exist_ok=True)
    config["bos_token_id"] = tokenizer.bos_token_id
    config["eos_token_id"] = _one_or_list(tokenizer.eos_token_ids)
    config["upcycled_from"] = {"file": gguf_path.name, "noise": noise, "seed": seed}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(tokenizer, out_dir)
    # Written last and renamed into place, so a directory with model.safetensors is a whole
    # one; the scratch folder keeps the half-written file out of loaders' *.safetensors globs.
    scratch = out_dir / ".upcycle-partial"
    scratch.mkdir(exist_ok=True)
    mx.save_safetensors(str(scratch / "model.safetensors"), weights, metadata={"format": "mlx"})
    (scratch / "model.safetensors").replace(out_dir / "model.safetensors")
    scratch.rmdir()
    return out_dir


def mixtral_config(
    llama_config: dict[str, Any],
    quantization: dict[str, dict[str, int]],
    num_experts: int,
    top_k: int,
) -> dict[str, Any]:
    """config.json for the upcycled model: the llama sizes under mixtral's names, plus experts."""
    if llama_config.get("attention_bias") or llama_config.get("mlp_bias"):
        raise ModelError("mixtral has no attention or MLP biases; this model uses them")
    # Mixtral derives head_dim from the other sizes; a llama that sets it otherwise cannot move.
    head_dim = llama_config["hidden_size"] // llama_config["num_attention_heads"]
    if llama_config.get("head_dim", head_dim) != head_dim:
        raise ModelError(
            f"head_dim {llama_config['head_dim']} != hidden_size / num_attention_heads "
            f"({head_dim}): mixtral cannot express this model"
        )
    config: dict[str, Any] = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
    config.update({k: llama_config[k] for k in _SHARED_CONFIG_KEYS if k in llama_config})
    config["num_local_experts"] = num_experts
    config["num_experts_per_tok"] = top_k
    if quantization:
        config["quantization"] = _quantization_entry(quantization)
    return config


def _quantization_entry(quantization: dict[str, dict[str, int]]) -> dict[str, Any]:
    """mlx-lm's ``quantization`` config: the commonest setting plus per-module exceptions.

    mlx-lm would infer each module's bits from its shapes anyway; naming the exceptions (for
    SmolLM2, the 8-bit embedding) keeps the file honest for any other reader.
    """
    settings = Counter((q["group_size"], q["bits"]) for q in quantization.values())
    (group_size, bits), _ = settings.most_common(1)[0]
    entry: dict[str, Any] = {"group_size": group_size, "bits": bits}
    for module, q in sorted(quantization.items()):
        if (q["group_size"], q["bits"]) != (group_size, bits):
            moe_module = module.replace(".mlp.", ".block_sparse_moe.switch_mlp.")
            entry[moe_module] = {"group_size": q["group_size"], "bits": q["bits"]}
    return entry


def _stacked_experts(
    weights: dict[str, mx.array], dense: str, num_experts: int, noise: float, key: mx.array
) -> dict[str, mx.array]:
    """One dense projection's tensors repeated along a new expert axis 0, optionally perturbed.

    The perturbation multiplies a quantization group's scale and bias by the same factor, which
    multiplies every weight of that group by it (w = q * scale + bias) and leaves the packed
    integers valid. An unquantized projection has its weights multiplied instead.
    """
    stacked = {
        suffix: mx.repeat(weights[f"{dense}.{suffix}"][None], num_experts, axis=0)
        for suffix in ("weight", "scales", "biases")
        if f"{dense}.{suffix}" in weights
    }  # each [E, out, ...]
    if noise == 0:
        return stacked
    perturbed = ("scales", "biases") if "scales" in stacked else ("weight",)
    shape = stacked[perturbed[0]].shape  # [E, out, groups] or [E, out, in]
    factor = 1.0 + noise * mx.random.normal(shape, key=key)
    for suffix in perturbed:
        array = stacked[suffix]
        stacked[suffix] = (array.astype(mx.float32) * factor).astype(array.dtype)
    return stacked


def _write_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """tokenizer.json and tokenizer_config.json as transformers (and pomona.tokenizer) read them."""
    # The GGUF-built tokenizers.Tokenizer is the single source of truth; saving it keeps the
    # vocabulary, merges, pre-tokenizer and special tokens exactly as they tokenized before.
    tokenizer._backend.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer._add_bos_token,
        "chat_template": tokenizer.chat_template if tokenizer.has_own_chat_template else None,
    }
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _one_or_list(ids: tuple[int, ...]) -> int | list[int] | None:
    """config.json's eos_token_id: an int for one end token, a list for several."""
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)
