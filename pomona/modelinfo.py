"""Describe a model (family, layer count, bytes per layer) from its files, without MLX.

The coordinator plans placement before any worker loads weights, so it needs each layer's size
without loading a tensor. For a GGUF file we scan the header (metadata and tensor table); for an
MLX/Hugging Face checkpoint directory we read config.json and each safetensors file's JSON header.
Both read a few MB at most, however large the model.

Bytes are grouped the way stages hold them: `layer_bytes[i]` for transformer block i,
`embed_bytes` for the token embedding (first stage), `head_bytes` for the final norm and the output
projection (last stage). With tied embeddings the head *is* the embedding matrix, so `head_bytes`
counts it again: a last stage that is not also the first needs its own copy.

Mixture-of-Experts models add `num_experts` (routed experts per MoE layer), `moe_layers` and
`expert_bytes[i]`, the bytes of ONE routed expert of layer i (0 for dense layers): the stacked
expert tensors of the layer (weights, scales, biases) divided by the expert count. `layer_bytes`
still counts the whole layer, experts included; attention, the router and shared experts form the
layer's non-expert part (`non_expert_bytes`), which always stays on the layer's stage node. A
layer is MoE when it has routed-expert tensors: `.switch_mlp.` or `.experts.` in an mlx-lm name,
`ffn_*_exps` (or per-expert `ffn_gate.E`) in a GGUF; the count comes from the config, or else from
the stacked tensors' expert axis. (The worker finds the expert *module* by its type, see
worker/families/base.py; the coordinator needs only these byte counts.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pomona.errors import ModelError
from pomona.gguf_header import GGUF_MAGIC, read_gguf_header

DEFAULT_CONTEXT_LENGTH = 4096

# GGUF architecture names that differ from mlx-lm's model_type (the rest are the same).
_GGUF_ARCHITECTURES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "deepseek2": "deepseek_v2"}
# Multimodal checkpoints (llama4) carry vision weights the text pipeline never loads.
_IGNORED_PREFIXES = ("vision_model.", "vision_tower.", "multi_modal_projector.", "visual.")
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FINAL_NORM_NAME = re.compile(r"(?:^|\.)norm\.(?:weight|bias)$")
# Routed experts (never the shared experts, `shared_expert(s).`, nor the router, `gate.`):
# mlx-lm's stacked SwitchGLU (`switch_mlp`, Llama 4's `experts`) and Hugging Face's per-expert
# or stacked names (`experts.3.w1`, `experts.gate_up_proj`).
_EXPERT_NAME = re.compile(r"\.(?:switch_mlp|experts)\.")
_PER_EXPERT_NAME = re.compile(r"\.experts\.\d+\.")  # Hugging Face: one tensor per expert
_GGUF_EXPERT_NAME = re.compile(r"^blk\.\d+\.ffn_(?:[a-z_]+_exps\.|(?:gate|up|down)\.\d+\.)")
# Where config.json gives the routed-expert count (first key present wins); without one, the
# stacked expert tensors' first axis is the count.
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

@dataclass(frozen=True)
class ModelInfo:
    path: Path
    format: str  # "gguf" or "mlx" (a checkpoint directory)
    architecture: str  # mlx-lm model_type: "llama", "llama4", "mixtral", "qwen3_moe", ...
    num_layers: int
    context_length: int
    layer_bytes: tuple[int, ...]  # one entry per transformer block
    embed_bytes: int
    head_bytes: int  # final norm + output projection (the embedding again when tied)
    tied_embeddings: bool
    num_experts: int = 0  # routed experts per MoE layer; 0 for a dense model
    moe_layers: tuple[int, ...] = ()  # ascending
    expert_bytes: tuple[int, ...] = ()  # one routed expert of each layer; () = all dense
    hidden_size: int = 0  # width of the hidden states that travel between stages (0: unknown)
    experts_per_token: int = 0  # the router's top-k (0 for dense)
    kv_bytes_per_token: int = 0  # KV cache bytes per token of context, per layer (float16 cache)

    def __post_init__(self) -> None:
        if not self.expert_bytes:
            object.__setattr__(self, "expert_bytes", (0,) * self.num_layers)
        if len(self.layer_bytes) != self.num_layers or len(self.expert_bytes) != self.num_layers:
            raise ValueError("layer_bytes and expert_bytes need one entry per layer")
        moe = tuple(i for i, size in enumerate(self.expert_bytes) if size > 0)
        if self.moe_layers != moe or (self.num_experts > 0) != bool(moe):
            raise ValueError(
                f"moe_layers {self.moe_layers} and num_experts {self.num_experts} disagree with "
                f"the layers whose expert_bytes are set {moe}"
            )

    @property
    def total_bytes(self) -> int:
        """Size of the weights, each counted once (a tied embedding is one matrix)."""
        shared = self.embed_bytes if self.tied_embeddings else 0
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes - shared

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def non_expert_bytes(self, layer: int) -> int:
        """Bytes of layer `layer` without its routed experts (attention, router, shared experts)."""
        return self.layer_bytes[layer] - self.num_experts * self.expert_bytes[layer]


def _shape_facts(config: dict) -> dict[str, int]:
    """hidden_size, experts_per_token and kv_bytes_per_token from config.json-style keys."""
    hidden = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    if config.get("kv_lora_rank"):  # MLA (DeepSeek): mlx-lm caches the latent and the rope key
        per_token = int(config["kv_lora_rank"]) + int(config.get("qk_rope_head_dim") or 0)
    else:
        per_token = 2 * kv_heads * head_dim
    top_k = 0
    for key in ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_topk", "moe_k"):
        if isinstance(config.get(key), int):
            top_k = config[key]
            break
    return {"hidden_size": hidden, "experts_per_token": top_k, "kv_bytes_per_token": 2 * per_token}


def _experts(
    source: Path, num_experts: int, layer_expert_bytes: list[int]
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(num_experts, moe_layers, expert_bytes) from each layer's total routed-expert bytes."""
    moe_layers = tuple(i for i, size in enumerate(layer_expert_bytes) if size > 0)
    if not moe_layers:
        return 0, (), ()
    if num_experts < 1:
        raise ModelError(
            f"{source}: layer {moe_layers[0]} has routed-expert weights but the config gives no "
            "expert count (num_local_experts, num_experts, n_routed_experts or expert_count)"
        )
    for layer in moe_layers:
        if layer_expert_bytes[layer] % num_experts:
            raise ModelError(
                f"{source}: layer {layer}'s expert weights ({layer_expert_bytes[layer]} bytes) do "
                f"not split into {num_experts} equal experts; the expert count in the config "
                "does not match the weights"
            )
    return num_experts, moe_layers, tuple(size // num_experts for size in layer_expert_bytes)


def describe_model(source: str) -> ModelInfo:
    """Describe "default" (the fetched SmolLM2 GGUF), a .gguf file or a checkpoint directory."""
    if source == "default":
        from pomona.fetch import default_model_path  # lazy: fetch pulls in download machinery

        path = default_model_path()
        if not path.is_file():
            raise ModelError(
                f"the default model is not downloaded yet (expected at {path}); run `pomona fetch`"
            )
        return _describe_gguf(path)
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise ModelError(f"model {source} does not exist; check the `model:` path in cluster.yaml")
    if path.is_dir():
        return _describe_checkpoint(path)
    if _has_gguf_magic(path):
        return _describe_gguf(path)
    if path.suffix == ".gguf":
        raise ModelError(f"model {path} is named .gguf but is not a GGUF file (wrong magic bytes)")
    raise ModelError(
        f"model {path} is not a GGUF file or a checkpoint directory "
        "(a directory with config.json and *.safetensors)"
    )


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(4) == GGUF_MAGIC
    except OSError as error:
        raise ModelError(f"cannot read model {path}: {error}") from None


# --- GGUF ---------------------------------------------------------------------------------------


def _describe_gguf(path: Path) -> ModelInfo:
    header = read_gguf_header(path, skip_arrays=True)  # arrays: the vocabulary, not needed here
    metadata, tensors = header.metadata, header.tensor_bytes
    if int(metadata.get("split.count", 1)) > 1:
        raise ModelError(
            f"{path} is one part of a split GGUF; merge the parts into one file first "
            "(llama.cpp's `llama-gguf-split --merge`)"
        )
    arch = metadata.get("general.architecture")
    num_layers = metadata.get(f"{arch}.block_count")
    if not isinstance(arch, str) or not isinstance(num_layers, int):
        raise ModelError(f"{path}: GGUF metadata lacks general.architecture or block_count")
    architecture = _GGUF_ARCHITECTURES.get(arch, arch)
    if arch == "llama" and metadata.get("llama.expert_count", 0) > 0:
        architecture = "mixtral"  # llama.cpp files Mixtral under the llama architecture
    if arch == "deepseek2" and metadata.get("deepseek2.expert_gating_func") == 2:
        architecture = "deepseek_v3"  # V3 gates experts with a sigmoid (2); V2 with softmax (1)

    layer_bytes = [0] * num_layers
    layer_expert_bytes = [0] * num_layers
    embed_bytes = head_bytes = 0
    has_output = False
    for name, size in tensors:
        if name.startswith("blk."):
            layer = int(name.split(".")[1])
            if layer < num_layers:  # extra blocks (e.g. multi-token prediction) are never run
                layer_bytes[layer] += size
                if _GGUF_EXPERT_NAME.match(name):
                    layer_expert_bytes[layer] += size
        elif name.startswith("token_embd"):
            embed_bytes += size
        elif name.startswith(("output_norm", "output.")):
            head_bytes += size
            has_output = has_output or name.startswith("output.")
    tied = not has_output
    if tied:
        head_bytes += embed_bytes
    num_experts, moe_layers, expert_bytes = _experts(
        path, int(metadata.get(f"{arch}.expert_count", 0)), layer_expert_bytes
    )
    facts = _shape_facts(
        {
            "hidden_size": metadata.get(f"{arch}.embedding_length"),
            "num_attention_heads": metadata.get(f"{arch}.attention.head_count"),
            "num_key_value_heads": metadata.get(f"{arch}.attention.head_count_kv"),
            "num_experts_per_tok": metadata.get(f"{arch}.expert_used_count"),
        }
    )
    return ModelInfo(
        path=path,
        format="gguf",
        architecture=architecture,
        num_layers=num_layers,
        context_length=int(metadata.get(f"{arch}.context_length", DEFAULT_CONTEXT_LENGTH)),
        layer_bytes=tuple(layer_bytes),
        embed_bytes=embed_bytes,
        head_bytes=head_bytes,
        tied_embeddings=tied,
        num_experts=num_experts,
        moe_layers=moe_layers,
        expert_bytes=expert_bytes,
        **facts,
    )


# --- checkpoint directories (config.json + safetensors) ----------------------------------------


def _safetensors_sizes(path: Path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(bytes, shape) per tensor from a safetensors header: u64 little-endian length, then JSON."""
    try:
        with path.open("rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if not 0 < header_length <= min(path.stat().st_size - 8, 100 * 2**20):
                raise ValueError(f"header length {header_length} is impossible")
            header = json.loads(file.read(header_length))
        return {
            name: (
                int(entry["data_offsets"][1]) - int(entry["data_offsets"][0]),
                tuple(int(n) for n in entry["shape"]),
            )
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ModelError(f"{path} is not a readable safetensors file ({error})") from None


def _describe_checkpoint(path: Path) -> ModelInfo:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path} is not a model: no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{config_path} is not readable JSON ({error})") from None
    # llama4 nests the language model's settings under text_config; keys there take precedence.
    text = {**config, **(config.get("text_config") or {})}
    architecture = config.get("model_type")
    num_layers = text.get("num_hidden_layers")
    if not isinstance(architecture, str) or not isinstance(num_layers, int) or num_layers < 1:
        raise ModelError(f"{config_path} lacks model_type or a positive num_hidden_layers")

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} has config.json but no *.safetensors weights")
    layer_bytes = [0] * num_layers
    layer_expert_bytes = [0] * num_layers
    stacked: dict[int, str] = {}  # expert-axis length -> a stacked expert tensor that has it
    embed_bytes = head_bytes = lm_head_bytes = 0
    for file in files:
        for name, (size, shape) in _safetensors_sizes(file).items():
            if name.startswith(_IGNORED_PREFIXES):
                continue
            layer = _LAYER_NAME.search(name)
            if layer:
                index = int(layer.group(1))
                if index < num_layers:  # extra (MTP) layers are dropped by mlx-lm
                    layer_bytes[index] += size
                    if _EXPERT_NAME.search(name):
                        layer_expert_bytes[index] += size
                        if shape and not _PER_EXPERT_NAME.search(name):
                            stacked.setdefault(shape[0], name)  # experts are the first axis
            elif "embed_tokens" in name:
                embed_bytes += size
            elif "lm_head" in name:
                lm_head_bytes += size
            elif _FINAL_NORM_NAME.search(name):
                head_bytes += size
    empty = [index for index, size in enumerate(layer_bytes) if size == 0]
    if empty:
        raise ModelError(
            f"{config_path} says {num_layers} layers but the safetensors hold no weights for "
            f"layer {empty[0]}; the checkpoint is incomplete"
        )
    # mlx-lm's llama defaults tie_word_embeddings to True; the other families to False. A
    # checkpoint without lm_head can only work tied; with tying on, mlx-lm drops any lm_head.
    tie_setting = text.get("tie_word_embeddings", architecture == "llama")
    tied = lm_head_bytes == 0 or bool(tie_setting)
    head_bytes += embed_bytes if tied else lm_head_bytes
    counts = [text[key] for key in _EXPERT_COUNT_KEYS if isinstance(text.get(key), int)]
    for length, name in stacked.items():
        if counts and length != counts[0]:
            raise ModelError(
                f"{config_path} gives {counts[0]} experts per MoE layer but {name} stacks "
                f"{length}; the config does not match the weights"
            )
    if not counts and len(stacked) == 1:
        counts = list(stacked)  # the stacked tensors say how many experts there are
    num_experts, moe_layers, expert_bytes = _experts(
        config_path, counts[0] if counts else 0, layer_expert_bytes
    )
    facts = _shape_facts(text)
    return ModelInfo(
        path=path,
        format="mlx",
        architecture=architecture,
        num_layers=num_layers,
        context_length=int(text.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH),
        layer_bytes=tuple(layer_bytes),
        embed_bytes=embed_bytes,
        head_bytes=head_bytes,
        tied_embeddings=tied,
        num_experts=num_experts,
        moe_layers=moe_layers,
        expert_bytes=expert_bytes,
        **facts,
    )
