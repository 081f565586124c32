"""Tiny random checkpoints of every supported family, and the single-process oracle.

`make_tiny_checkpoint` writes a seeded, randomly initialised model in the exact layout
`mlx_lm.utils.load_model` reads (config.json, model.safetensors) plus a byte-level BPE
tokenizer (tokenizer.json, tokenizer_config.json), so tests and benchmarks never download.
`reference_generate` / `reference_logits` run the whole model in one process with mlx-lm:
the distributed paths must reproduce them (greedy tokens identical, logits allclose).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes, load_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# The families with hand-checked layouts in tests/layouts.py; EXTRA_FAMILIES run through the
# generic stage adapter (tests/test_families.py).
FAMILIES = ("llama", "llama4", "mixtral", "qwen3_moe", "deepseek_v3")
EXTRA_FAMILIES = (
    "qwen2", "qwen3", "qwen2_moe", "gemma3_text", "phi3", "mistral", "glm4_moe", "olmoe",
    "gpt_oss", "granitemoe", "phimoe", "minimax", "granite", "olmo2",
)  # fmt: skip
# MoE families among EXTRA_FAMILIES (every one holds SwitchGLU experts).
EXTRA_MOE_FAMILIES = ("qwen2_moe", "glm4_moe", "olmoe", "gpt_oss", "granitemoe", "phimoe", "minimax")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
# The tokenizer has exactly VOCAB_SIZE entries, so every id the model can emit decodes.
VOCAB_SIZE = 300
QUANT_GROUP_SIZE = 32

# Init scales (std of a normal). mlx-lm's default init makes tiny random models collapse onto
# one repeated token. Measured with these: skipping any one layer flips 40-100% of a 45-token
# prompt's argmaxes (a lost or doubled pipeline layer cannot go unnoticed), nearly every expert
# gets tokens, and 12 greedy tokens hold >= 5 distinct ids for 3 prompts x 20 seeds of every
# family. A larger embedding std turns the model into a fixed bigram map.
EMBEDDING_STD = 0.5
LINEAR_STD = 0.12
HEAD_STD = 0.15
SELF_PENALTY = 0.2  # how far the head leans away from the embedding (see _reinitialise)
ROUTER_STD = 0.3  # larger, so each token's expert choice varies and is rarely a near tie

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Merges are learned from this text only so that common English pieces become one token.
_TRAINING_TEXT = """\
The capital of France is Paris. The quick brown fox jumps over the lazy dog.
Hello, world! What is the weather like today? It is sunny and warm in the city.
Machine learning models run on many machines; the layers are split across the nodes.
Each token is sent to the experts that the router chooses, and the results are added.
"""

_COMMON = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "vocab_size": VOCAB_SIZE,
    "tie_word_embeddings": False,
}

# Per-family defaults on top of _COMMON; every input dimension is a multiple of 32 so that
# every Linear / Embedding / SwitchLinear / MultiLinear quantizes with group size 32.
# DeepSeek-style multi-head latent attention with grouped routing, shared by its descendants.
_MLA_MOE = {
        "num_hidden_layers": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "moe_intermediate_size": 64,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
}

_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"num_hidden_layers": 6},
    "llama4": {
        # mlx_lm.models.llama4 reads everything from the nested text_config (see _build_config).
        "num_hidden_layers": 8,
        "interleave_moe_layer_step": 2,  # MoE on odd layers (idx % 2 == 1)
        "num_local_experts": 4,
        "num_experts_per_tok": 1,  # mlx-lm's Llama 4 MoE asserts top-1
        "intermediate_size": 64,  # experts and shared expert
        "intermediate_size_mlp": 128,  # dense layers
        "attention_chunk_size": 8,  # a ~20-token prompt crosses chunks
        "use_qk_norm": True,
        "attention_bias": False,
        "rope_scaling": None,
    },
    "mixtral": {
        "num_hidden_layers": 4,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,  # per expert
    },
    "qwen3_moe": {
        "num_hidden_layers": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "deepseek_v3": {
        **_MLA_MOE,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,  # layer 0 dense, layers 1.. MoE
        "moe_layer_freq": 1,
        "routed_scaling_factor": 1.5,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "rope_scaling": None,
    },
    # --- families served by the generic stage adapter (no file of their own) ----------------
    "qwen2": {"num_hidden_layers": 4, "tie_word_embeddings": True},
    "qwen3": {"num_hidden_layers": 4},
    "qwen2_moe": {
        # Shared expert behind a sigmoid gate, plus softmax top-k routed experts.
        "num_hidden_layers": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
    },
    "gemma3_text": {
        # Sliding-window layers (a rotating cache) with a global layer every 2nd; embeddings
        # scaled by sqrt(hidden_size); the window is shorter than the test prompt.
        "num_hidden_layers": 4,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 16,
        "rope_local_base_freq": 10000.0,
    },
    "phi3": {"num_hidden_layers": 4},  # fused qkv and gate_up projections
    # Mistral loads as mlx-lm's llama (MODEL_REMAPPING), here with sliding-window layers.
    "mistral": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "sliding_window": 8,
    },
    "glm4_moe": {
        # Layer 0 dense; grouped sigmoid routing with a correction bias and a shared expert.
        "num_hidden_layers": 4,
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
        "n_group": 2,
        "topk_group": 1,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "routed_scaling_factor": 1.5,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "use_qk_norm": True,
        "attention_bias": False,
        "partial_rotary_factor": 0.5,
        "rope_scaling": None,
    },
    "olmoe": {
        "num_hidden_layers": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "norm_topk_prob": False,
    },
    "gpt_oss": {
        # Attention sinks, alternating sliding/full attention, biased SwiGLU experts.
        "num_hidden_layers": 4,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
    "granitemoe": {
        # Embedding multiplier, residual and attention multipliers, logits scaling.
        "num_hidden_layers": 4,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "logits_scaling": 2.0,
        "attention_multiplier": 0.25,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_bias": False,
    },
    "phimoe": {
        # LayerNorms with biases, a biased lm_head, sparsemixer top-2 routing.
        "num_hidden_layers": 4,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "original_max_position_embeddings": 2048,
        "rope_scaling": None,
    },
    "minimax": {
        "num_hidden_layers": 4,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "shared_intermediate_size": 0,
        "rotary_dim": 8,
    },
    "granite": {
        "num_hidden_layers": 4,
        "logits_scaling": 2.0,
        "attention_multiplier": 0.25,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "olmo2": {"num_hidden_layers": 4},
    # MLA attention like DeepSeek-V3 (an exception of the generic adapter: array masks).
    "glm4_moe_lite": {
        **_MLA_MOE,
        "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 0,
    },
    # A state-space model: its layers keep a recurrent state, so it cannot be split (test_errors).
    "mamba": {
        "num_hidden_layers": 2,
        "state_size": 16,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 8,
        "tie_word_embeddings": True,
    },
}

_EMBEDDINGS = ("embed_tokens", "embeddings")  # token embedding module names (mamba: embeddings)
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE: 256 byte symbols, a few dozen learned merges, three ChatML specials."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    # Should the text run out of pairs to merge, fill up with never-produced reserved tokens.
    missing = VOCAB_SIZE - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(max(missing, 0))])
    return tokenizer


def _build_config(family: str, num_layers: int | None, overrides: dict[str, Any]) -> dict:
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + EXTRA_FAMILIES}")
    args = {**_COMMON, **_FAMILY_CONFIGS[family], **overrides}
    if num_layers is not None:
        args["num_hidden_layers"] = num_layers
    if family == "llama4":
        # The global (NoPE) mask is built from cache[3]: fewer than 4 layers cannot run.
        if args["num_hidden_layers"] < 4:
            raise ValueError("llama4 needs at least 4 layers (mlx-lm indexes cache[3])")
        tie = args.pop("tie_word_embeddings")
        text_config = {**args, "model_type": "llama4_text"}
        return {"model_type": "llama4", "tie_word_embeddings": tie, "text_config": text_config}
    return {"model_type": family, **args}


def _reinitialise(model: nn.Module) -> None:
    """Replace mlx-lm's default init with scales that keep tiny random models non-degenerate."""
    params = dict(tree_flatten(model.parameters()))
    head = next((k for k in params if k.endswith("lm_head.weight")), None)
    for name, value in params.items():
        module_name, _, leaf = name.rpartition(".")
        if module_name.endswith("norm"):  # every RMSNorm: q_norm, kv_a_layernorm, norm, ...
            new = mx.ones(value.shape)
        elif leaf == "bias":
            new = mx.zeros(value.shape)
        elif leaf == "e_score_correction_bias":
            # Small, so DeepSeek's bias-corrected selection differs a little from raw scores.
            new = 0.05 * mx.random.normal(value.shape)
        elif module_name.endswith(_EMBEDDINGS):
            new = EMBEDDING_STD * mx.random.normal(value.shape)
        elif name == head:
            new = HEAD_STD * mx.random.normal(value.shape)
        elif module_name.endswith((".gate", ".router")):  # MoE routers, never gate_proj
            new = ROUTER_STD * mx.random.normal(value.shape)
        else:
            new = LINEAR_STD * mx.random.normal(value.shape)
        params[name] = new.astype(value.dtype)
    # The residual stream still carries the input token's embedding, so the head favours
    # "x follows x" and greedy decoding settles on one repeated token. Lean the head away from
    # the embedding; a tied head cannot lean, so flip the final norm's sign instead.
    embed = next(k for k in params if k.endswith(tuple(f"{e}.weight" for e in _EMBEDDINGS)))
    if head is not None:
        params[head] = params[head] - SELF_PENALTY * params[embed]
    else:
        final_norm = next(k for k in params if k.endswith(("model.norm.weight", "norm_f.weight")))
        params[final_norm] = -params[final_norm]
    model.update(tree_unflatten(list(params.items())))


def _cast(model: nn.Module, dtype: mx.Dtype) -> None:
    # Mirror mlx-lm's convert: some parameters (DeepSeek's e_score_correction_bias) stay fp32.
    keep = getattr(model, "cast_predicate", lambda _name: True)
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, v.astype(dtype) if keep(k) else v) for k, v in params]))


def make_tiny_checkpoint(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    quantize_bits: int | None = None,
    dtype: str = "float32",
    **config_overrides: Any,
) -> Path:
    """Write a tiny random checkpoint of `family` into out_dir in the layout mlx-lm loads:
    config.json, model.safetensors, tokenizer.json, tokenizer_config.json. Returns out_dir.

    config_overrides replace entries of the family's config (for llama4, of text_config),
    e.g. tie_word_embeddings=True, or layer_types=[...] with sliding_window=4 for llama.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if quantize_bits not in (None, 4, 8):
        raise ValueError(f"quantize_bits must be None, 4 or 8, got {quantize_bits!r}")

    tokenizer = build_tokenizer()
    eos_token_id = tokenizer.token_to_id(EOS_TOKEN)
    config = _build_config(family, num_layers, config_overrides)
    vocab_size = config.get("text_config", config)["vocab_size"]
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tokenizer.get_vocab_size()}")
    config.update(eos_token_id=eos_token_id, torch_dtype=dtype)

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)  # mlx-lm's own remapping (mistral -> llama)
    model = model_class(args_class.from_dict(config))
    _reinitialise(model)
    _cast(model, _DTYPES[dtype])
    if quantize_bits is not None:

        def quantizable(_path: str, module: nn.Module) -> bool:
            # load_model re-quantizes exactly the modules whose "<path>.scales" were saved.
            weight = getattr(module, "weight", None)
            return (
                hasattr(module, "to_quantized")
                and weight is not None
                and weight.shape[-1] % QUANT_GROUP_SIZE == 0
            )

        nn.quantize(
            model, group_size=QUANT_GROUP_SIZE, bits=quantize_bits, class_predicate=quantizable
        )
        config["quantization"] = {"group_size": QUANT_GROUP_SIZE, "bits": quantize_bits}

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "model_max_length": 2048,
        "chat_template": _CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def reference_generate(model_dir: Path, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from single-process mlx-lm: mlx_lm.utils.load_model(model_dir) and
    mlx_lm.generate.generate_step with argmax sampling; returns the generated token ids
    (max_tokens of them, do not stop at EOS)."""
    model, _ = load_model(Path(model_dir))
    prompt = mx.array(prompt_ids, dtype=mx.uint32)
    # generate_step itself never checks EOS (stream_generate does), so this yields max_tokens.
    steps = generate_step(prompt, model, max_tokens=max_tokens, sampler=_greedy)
    return [int(token) for token, _ in itertools.islice(steps, max_tokens)]


def reference_logits(model_dir: Path, token_ids: list[int]) -> np.ndarray:
    """Logits of the last position for a single forward pass of the full model over
    token_ids (no kv cache), [vocab], float32."""
    model, _ = load_model(Path(model_dir))
    logits = model(mx.array([token_ids], dtype=mx.uint32))  # [1, L, vocab]
    return np.array(logits[0, -1].astype(mx.float32))


def chain_generate(
    model_path: Path, layout: list[tuple[int, int]], prompt_ids: list[int], max_tokens: int
) -> tuple[np.ndarray, list[int]]:
    """Pomona's stages of ``layout`` in this process, chained: the first step's logits (float32)
    and ``max_tokens`` greedy tokens, one decode step at a time as the pipeline runs them."""
    from worker.stage import load_stage  # the system under test, not the oracle

    last = len(layout) - 1
    stages = [load_stage(model_path, s, e, i == 0, i == last) for i, (s, e) in enumerate(layout)]
    caches = [stage.new_caches() for stage in stages]

    def step(ids: list[int]) -> mx.array:
        hidden = mx.array([ids], dtype=mx.int32)
        for stage, stage_caches in zip(stages, caches):
            hidden = stage.forward(hidden, stage_caches)
        return stages[-1].logits(hidden)

    logits = step(prompt_ids)
    tokens = [int(mx.argmax(logits).item())]
    while len(tokens) < max_tokens:
        tokens.append(int(mx.argmax(step([tokens[-1]])).item()))
    return np.array(logits.astype(mx.float32)), tokens
