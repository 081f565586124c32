"""The tiny random checkpoints load strictly in mlx-lm and give a usable, non-degenerate oracle."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
from tiny_models import FAMILIES, make_tiny_checkpoint, reference_generate, reference_logits
from tokenizers import Tokenizer

# (family, quantize_bits, dtype). Unquantized bf16/fp16 MoE is left out on purpose: on the
# MLX CPU backend GatherMM (SwitchGLU's matmul) only supports float32.
VARIANTS = [(family, None, "float32") for family in FAMILIES] + [
    ("llama", 4, "float32"),
    ("mixtral", 4, "float32"),
    ("deepseek_v3", 8, "float32"),
    ("llama", None, "bfloat16"),
    ("qwen3_moe", 4, "bfloat16"),
]

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _variant_id(variant: tuple[str, int | None, str]) -> str:
    family, bits, dtype = variant
    return f"{family}-{'q' + str(bits) if bits else 'dense'}-{dtype}"


@pytest.fixture(scope="module", params=VARIANTS, ids=_variant_id)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family, bits, dtype = request.param
    out_dir = tmp_path_factory.mktemp(_variant_id(request.param))
    return make_tiny_checkpoint(family, out_dir, quantize_bits=bits, dtype=dtype)


def _prompt_ids(model_dir: Path) -> list[int]:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT).ids


def test_loads_strictly_and_generates_varied_tokens(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    model, _ = load_model(checkpoint)  # strict=True: every saved name matches a parameter
    if "quantization" in config:
        assert any(name.endswith(".scales") for name, _ in tree_flatten(model.parameters()))
    vocab_size = config.get("text_config", config)["vocab_size"]

    tokens = reference_generate(checkpoint, _prompt_ids(checkpoint), max_tokens=12)

    assert len(tokens) == 12
    assert len(set(tokens)) >= 3
    assert all(0 <= t < vocab_size for t in tokens)


def test_tokenizer_round_trips_and_fits_vocab(checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    config = json.loads((checkpoint / "config.json").read_text())
    vocab_size = config.get("text_config", config)["vocab_size"]

    ids = tokenizer.encode("Hello, world!").ids

    assert tokenizer.decode(ids) == "Hello, world!"
    assert tokenizer.get_vocab_size() <= vocab_size
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.encode(PROMPT).ids[0] == tokenizer.token_to_id("<|im_start|>")


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_logits_agree_with_generation(family: str, tmp_path: Path) -> None:
    # The cached decode path (generate_step) and one uncached forward pass must pick the same
    # first token; DeepSeek's MLA takes a different matmul order for a single query.
    model_dir = make_tiny_checkpoint(family, tmp_path)
    prompt_ids = _prompt_ids(model_dir)

    logits = reference_logits(model_dir, prompt_ids)
    first = reference_generate(model_dir, prompt_ids, max_tokens=1)

    assert logits.shape == (300,) and logits.dtype == np.float32
    assert first == [int(np.argmax(logits))]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] > 1e-3


def test_same_seed_same_model_and_other_seed_differs(tmp_path: Path) -> None:
    prompt_ids = list(range(3, 23))
    a = reference_generate(make_tiny_checkpoint("mixtral", tmp_path / "a"), prompt_ids, 8)
    b = reference_generate(make_tiny_checkpoint("mixtral", tmp_path / "b"), prompt_ids, 8)
    c = reference_generate(make_tiny_checkpoint("mixtral", tmp_path / "c", seed=1), prompt_ids, 8)

    assert a == b
    assert a != c


def test_config_overrides_reach_the_model(tmp_path: Path) -> None:
    # Sliding-window llama needs at least one full_attention layer: mlx-lm looks one up.
    layer_types = ["sliding_attention", "full_attention"] * 2
    model_dir = make_tiny_checkpoint(
        "llama",
        tmp_path,
        num_layers=4,
        tie_word_embeddings=True,
        layer_types=layer_types,
        sliding_window=4,
    )
    model, config = load_model(model_dir)

    assert len(model.layers) == 4 and config["sliding_window"] == 4
    assert not hasattr(model, "lm_head")
    assert len(set(reference_generate(model_dir, list(range(3, 23)), 12))) >= 3


def test_llama4_layout_has_nested_text_config_and_interleaved_moe(tmp_path: Path) -> None:
    model_dir = make_tiny_checkpoint("llama4", tmp_path)
    model, config = load_model(model_dir)

    assert config["model_type"] == "llama4"
    assert config["text_config"]["attention_chunk_size"] == 8
    assert [layer.is_moe_layer for layer in model.layers] == [False, True] * 4


def test_chat_template_renders_chatml(checkpoint: Path) -> None:
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(tokenizer_config["chat_template"])

    text = template.render(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )

    assert text == PROMPT
    assert tokenizer_config["eos_token"] == "<|im_end|>" and tokenizer_config["bos_token"] is None


def test_unknown_family_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_checkpoint("gpt2", tmp_path)
