"""describe_model on tiny hand-made GGUF files and safetensors checkpoints (no MLX)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from pomona.errors import ModelError
from pomona.modelinfo import ModelInfo, describe_model

DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A valid safetensors file of zeros: u64 header length, JSON header, then the data."""
    header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_BYTES[dtype] * int(np.prod(shape))
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))


def llama_tensors(prefix: str, num_layers: int, lm_head: bool) -> dict:
    tensors = {f"{prefix}model.embed_tokens.weight": ("BF16", (32, 8))}  # 512 bytes
    for layer in range(num_layers):
        base = f"{prefix}model.layers.{layer}."
        tensors[base + "self_attn.q_proj.weight"] = ("BF16", (8, 8))  # 128
        tensors[base + "mlp.down_proj.weight"] = ("U32", (8, 2))  # 64, quantized-style
        tensors[base + "mlp.down_proj.scales"] = ("BF16", (8, 1))  # 16
        tensors[base + "input_layernorm.weight"] = ("BF16", (8,))  # 16
    tensors[f"{prefix}model.norm.weight"] = ("BF16", (8,))  # 16
    if lm_head:
        tensors[f"{prefix}lm_head.weight"] = ("BF16", (32, 8))  # 512
    return tensors


def make_checkpoint(directory: Path, config: dict, tensors: dict, files: int = 1) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    for index in range(files):  # shards split the tensor list like HF's model-0000x-of-0000y
        part = {name: tensors[name] for name in names[index::files]}
        write_safetensors(directory / f"model-{index + 1:05d}-of-{files:05d}.safetensors", part)
    return directory


LAYER = 128 + 64 + 16 + 16


@pytest.mark.parametrize(
    "config, lm_head, tied, head_bytes",
    [
        ({"model_type": "llama", "num_hidden_layers": 3}, False, True, 16 + 512),  # llama: tied
        (
            {"model_type": "llama", "num_hidden_layers": 3, "tie_word_embeddings": False},
            True,
            False,
            16 + 512,
        ),  # fmt: skip
        (
            {"model_type": "qwen3_moe", "num_hidden_layers": 3, "tie_word_embeddings": True},
            True,
            True,
            16 + 512,
        ),  # fmt: skip
        ({"model_type": "mixtral", "num_hidden_layers": 3}, True, False, 16 + 512),
    ],
    ids=["llama-default-tied", "untied", "tied-with-redundant-lm-head", "mixtral"],
)
def test_checkpoint_layers_and_bytes(
    tmp_path: Path, config: dict, lm_head: bool, tied: bool, head_bytes: int
) -> None:
    path = make_checkpoint(tmp_path / "m", config, llama_tensors("", 3, lm_head), files=2)
    info = describe_model(str(path))
    assert (info.format, info.architecture, info.num_layers) == ("mlx", config["model_type"], 3)
    assert info.context_length == 4096  # default when config.json does not say
    assert info.layer_bytes == (LAYER,) * 3
    assert (info.embed_bytes, info.head_bytes, info.tied_embeddings) == (512, head_bytes, tied)
    assert info.total_bytes == 3 * LAYER + 512 + 16 + (0 if tied else 512)


def test_llama4_reads_text_config_and_ignores_vision_and_extra_layers(tmp_path: Path) -> None:
    tensors = llama_tensors("language_model.", 5, lm_head=True)  # layer 4: beyond num_layers
    tensors["vision_model.model.layers.0.mlp.fc1.weight"] = ("F32", (64, 64))
    tensors["multi_modal_projector.linear_1.weight"] = ("F32", (64, 64))
    config = {
        "model_type": "llama4",
        "text_config": {"num_hidden_layers": 4, "max_position_embeddings": 8192},
    }
    info = describe_model(str(make_checkpoint(tmp_path / "l4", config, tensors)))
    assert (info.architecture, info.num_layers, info.context_length) == ("llama4", 4, 8192)
    assert info.layer_bytes == (LAYER,) * 4
    assert (info.embed_bytes, info.head_bytes, info.tied_embeddings) == (512, 528, False)


def write_gguf(path: Path, arch: str = "llama", output: bool = False, **metadata: int) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(128)
    for key, value in metadata.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_token_list(["a", "bb", "<s>"])  # arrays in the header must be skipped correctly
    writer.add_token_scores([0.0, 1.0, 2.0])
    q8 = gguf.GGMLQuantizationType.Q8_0  # 32 values in 34 bytes
    writer.add_tensor("token_embd.weight", np.zeros((8, 68), np.uint8), raw_dtype=q8)
    for block in range(2):
        writer.add_tensor(f"blk.{block}.attn_q.weight", np.zeros((16, 16), np.float32))
        writer.add_tensor(f"blk.{block}.attn_norm.weight", np.zeros(16, np.float16))
    writer.add_tensor("output_norm.weight", np.zeros(16, np.float32))
    if output:
        writer.add_tensor("output.weight", np.zeros((8, 68), np.uint8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "arch, output, metadata, architecture, head_bytes, tied",
    [
        ("llama", False, {}, "llama", 64 + 544, True),
        ("llama", True, {}, "llama", 64 + 544, False),
        ("llama", True, {"expert_count": 8}, "mixtral", 64 + 544, False),
        ("qwen3moe", True, {}, "qwen3_moe", 64 + 544, False),
    ],
    ids=["llama-tied", "llama-untied", "mixtral", "qwen3moe"],
)
def test_gguf_layers_and_bytes(
    tmp_path: Path,
    arch: str,
    output: bool,
    metadata: dict,
    architecture: str,
    head_bytes: int,
    tied: bool,
) -> None:
    path = write_gguf(tmp_path / "m.gguf", arch, output, **metadata)
    info = describe_model(str(path))
    assert (info.format, info.architecture, info.num_layers, info.context_length) == (
        "gguf",
        architecture,
        2,
        128,
    )
    assert info.layer_bytes == (16 * 16 * 4 + 16 * 2,) * 2
    assert (info.embed_bytes, info.head_bytes, info.tied_embeddings) == (544, head_bytes, tied)
    # Our header scan must agree with the gguf package's full reader, byte for byte.
    assert info.total_bytes == sum(t.n_bytes for t in gguf.GGUFReader(path).tensors)


def test_default_model_missing_says_to_fetch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("pomona.fetch.default_model_path", lambda: tmp_path / "absent.gguf")
    with pytest.raises(ModelError, match="pomona fetch"):
        describe_model("default")
    monkeypatch.setattr("pomona.fetch.default_model_path", lambda: write_gguf(tmp_path / "d.gguf"))
    assert describe_model("default").num_layers == 2


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        describe_model(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="is not a model: no config.json"):
        describe_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="is not a GGUF file or a checkpoint directory"):
        describe_model(str(tmp_path / "notes.txt"))
    (tmp_path / "fake.gguf").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a GGUF file"):
        describe_model(str(tmp_path / "fake.gguf"))
    truncated = write_gguf(tmp_path / "t.gguf").read_bytes()[:200]
    (tmp_path / "t.gguf").write_bytes(truncated)
    with pytest.raises(ModelError, match="truncated or corrupt"):
        describe_model(str(tmp_path / "t.gguf"))


def test_checkpoint_errors(tmp_path: Path) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 3}
    no_weights = make_checkpoint(tmp_path / "a", config, {}, files=0)
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        describe_model(str(no_weights))
    missing_layer = make_checkpoint(tmp_path / "b", {**config, "num_hidden_layers": 4},
                                    llama_tensors("", 3, False))  # fmt: skip
    with pytest.raises(ModelError, match="no weights for layer 3"):
        describe_model(str(missing_layer))
    garbage = make_checkpoint(tmp_path / "c", config, llama_tensors("", 3, False))
    (garbage / "extra.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        describe_model(str(garbage))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not readable JSON"):
        describe_model(str(tmp_path / "d"))
    (tmp_path / "d" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="num_hidden_layers"):
        describe_model(str(tmp_path / "d"))


# --- Mixture-of-Experts structure ---------------------------------------------------------------

EXPERTS = 4
EXPERT = 3 * (32 + 8 + 8)  # one expert: gate/up/down, each a U32 weight + BF16 scales and biases


def moe_tensors(
    prefix: str, num_layers: int, moe_layers: set[int], block: str, extra: dict[str, tuple]
) -> dict:
    """Attention in every layer; a stacked expert block `block` (quantized) in moe_layers, a dense
    MLP elsewhere; `extra` (router, shared expert) added to every MoE layer."""
    tensors = {f"{prefix}model.embed_tokens.weight": ("BF16", (32, 8))}
    for layer in range(num_layers):
        base = f"{prefix}model.layers.{layer}."
        tensors[base + "self_attn.q_proj.weight"] = ("BF16", (8, 8))  # 128
        if layer not in moe_layers:
            tensors[base + "mlp.gate_proj.weight"] = ("BF16", (8, 8))  # 128
            continue
        for projection in ("gate_proj", "up_proj", "down_proj"):
            name = f"{base}{block}.{projection}."
            tensors[name + "weight"] = ("U32", (EXPERTS, 4, 2))  # 32 bytes per expert
            tensors[name + "scales"] = ("BF16", (EXPERTS, 4, 1))  # 8
            tensors[name + "biases"] = ("BF16", (EXPERTS, 4, 1))  # 8
        for name, entry in extra.items():
            tensors[base + name] = entry
    tensors[f"{prefix}model.norm.weight"] = ("BF16", (8,))
    return tensors


ROUTER = {"gate.weight": ("BF16", (EXPERTS, 8))}  # 64 bytes, stays with the layer
MOE_CASES = [
    # (id, config, tensor prefix, MoE layers, expert block, extra per MoE layer)
    (
        "mixtral",
        {"model_type": "mixtral", "num_hidden_layers": 3, "num_local_experts": EXPERTS},
        "",
        {0, 1, 2},
        "block_sparse_moe.switch_mlp",
        {"block_sparse_moe.gate.weight": ("BF16", (EXPERTS, 8))},
    ),
    (
        "qwen3_moe-mlp-only-layer",
        {"model_type": "qwen3_moe", "num_hidden_layers": 3, "num_experts": EXPERTS,
         "decoder_sparse_step": 1, "mlp_only_layers": [1]},
        "",
        {0, 2},
        "mlp.switch_mlp",
        {"mlp.gate.weight": ("BF16", (EXPERTS, 8))},
    ),  # fmt: skip
    (
        "llama4-interleaved-shared-expert",
        {"model_type": "llama4", "text_config": {"num_hidden_layers": 4,
         "num_local_experts": EXPERTS, "interleave_moe_layer_step": 2}},
        "language_model.",
        {1, 3},
        "feed_forward.experts",
        {"feed_forward.router.weight": ("BF16", (EXPERTS, 8)),
         "feed_forward.shared_expert.gate_proj.weight": ("BF16", (8, 8))},
    ),  # fmt: skip
    (
        "deepseek_v3-first-dense-shared-experts",
        {"model_type": "deepseek_v3", "num_hidden_layers": 3, "n_routed_experts": EXPERTS,
         "first_k_dense_replace": 1, "moe_layer_freq": 1},
        "",
        {1, 2},
        "mlp.switch_mlp",
        {"mlp.gate.weight": ("BF16", (EXPERTS, 8)),
         "mlp.shared_experts.gate_proj.weight": ("BF16", (8, 8))},
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "config, prefix, moe_layers, block, extra",
    [row[1:] for row in MOE_CASES],
    ids=[row[0] for row in MOE_CASES],
)
def test_checkpoint_moe_structure(
    tmp_path: Path, config: dict, prefix: str, moe_layers: set, block: str, extra: dict
) -> None:
    tensors = moe_tensors(prefix, config.get("text_config", config)["num_hidden_layers"],
                          moe_layers, block, extra)  # fmt: skip
    info = describe_model(str(make_checkpoint(tmp_path / "m", config, tensors, files=2)))
    extra_bytes = sum(DTYPE_BYTES[dtype] * int(np.prod(shape)) for dtype, shape in extra.values())
    assert (info.num_experts, info.moe_layers, info.is_moe) == (EXPERTS, tuple(sorted(moe_layers)),
                                                                 True)  # fmt: skip
    for layer in range(info.num_layers):
        is_moe = layer in moe_layers
        assert info.expert_bytes[layer] == (EXPERT if is_moe else 0)
        # layer_bytes keeps every expert; the non-expert part is attention + router + shared.
        assert info.layer_bytes[layer] == 128 + (EXPERTS * EXPERT + extra_bytes if is_moe else 128)
        assert info.non_expert_bytes(layer) == 128 + (extra_bytes if is_moe else 128)


def test_dense_checkpoint_has_no_experts(tmp_path: Path) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 3, "num_experts": 8}  # count alone: dense
    info = describe_model(str(make_checkpoint(tmp_path / "m", config, llama_tensors("", 3, False))))
    assert (info.num_experts, info.moe_layers, info.expert_bytes, info.is_moe) == (
        0, (), (0, 0, 0), False
    )  # fmt: skip


def test_hugging_face_per_expert_names_count_as_experts(tmp_path: Path) -> None:
    tensors = llama_tensors("", 2, False)
    for layer in range(2):
        for expert in range(EXPERTS):
            for w in ("w1", "w2", "w3"):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
                tensors[name] = ("BF16", (8, 4))  # 64 bytes
    config = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": EXPERTS}
    info = describe_model(str(make_checkpoint(tmp_path / "m", config, tensors)))
    assert (info.num_experts, info.moe_layers, info.expert_bytes) == (EXPERTS, (0, 1), (192, 192))
    config["num_local_experts"] = 5  # 4 * 192 bytes do not split into 5 experts
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="do not split into 5 equal experts"):
        describe_model(str(tmp_path / "m"))


def test_checkpoint_expert_count_differs_from_stacked_axis(tmp_path: Path) -> None:
    config = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 8}
    tensors = moe_tensors("", 2, {0, 1}, "block_sparse_moe.switch_mlp", {})
    with pytest.raises(ModelError, match="gives 8 experts per MoE layer but model.layers.0."):
        describe_model(str(make_checkpoint(tmp_path / "m", config, tensors)))


def test_checkpoint_expert_count_from_the_stacked_axis(tmp_path: Path) -> None:
    """A family whose config names its expert count otherwise: the stacked tensors give it."""
    config = {"model_type": "somemoe", "num_hidden_layers": 2, "n_experts_here": EXPERTS}
    tensors = moe_tensors("", 2, {0, 1}, "mlp.switch_mlp", {})
    info = describe_model(str(make_checkpoint(tmp_path / "m", config, tensors)))
    assert (info.num_experts, info.moe_layers) == (EXPERTS, (0, 1))


def test_gguf_stacked_experts(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_uint32("llama.expert_count", EXPERTS)
    writer.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    for block in range(2):
        writer.add_tensor(f"blk.{block}.attn_q.weight", np.zeros((16, 16), np.float32))
        writer.add_tensor(f"blk.{block}.ffn_gate_inp.weight", np.zeros((EXPERTS, 16), np.float32))
        for part in ("gate", "up", "down"):
            stacked = np.zeros((EXPERTS, 8, 16), np.float16)  # 256 bytes per expert
            writer.add_tensor(f"blk.{block}.ffn_{part}_exps.weight", stacked)
    writer.add_tensor("output_norm.weight", np.zeros(16, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = describe_model(str(path))
    assert (info.architecture, info.num_experts, info.moe_layers) == ("mixtral", EXPERTS, (0, 1))
    assert info.expert_bytes == (3 * 256,) * 2
    assert info.non_expert_bytes(0) == 16 * 16 * 4 + EXPERTS * 16 * 4  # attention + router


def test_model_info_rejects_inconsistent_expert_fields() -> None:
    common = dict(path=Path("/m"), format="mlx", architecture="mixtral", num_layers=2,
                  context_length=8, layer_bytes=(10, 10), embed_bytes=1, head_bytes=1,
                  tied_embeddings=False)  # fmt: skip
    assert ModelInfo(**common).expert_bytes == (0, 0)
    ModelInfo(**common, num_experts=2, moe_layers=(1,), expert_bytes=(0, 4))
    with pytest.raises(ValueError, match="disagree"):
        ModelInfo(**common, num_experts=2, moe_layers=(0, 1), expert_bytes=(0, 4))
    with pytest.raises(ValueError, match="one entry per layer"):
        ModelInfo(**common, num_experts=2, moe_layers=(1,), expert_bytes=(4,))
