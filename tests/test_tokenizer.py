"""pomona.tokenizer on small made-up tokenizers: checkpoint directories and GGUF metadata."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pomona.errors import ModelError
from pomona.gguf_header import read_gguf_header
from pomona.tokenizer import CHATML_TEMPLATE, load_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "You are a helpful assistant. Hello there, 2024!",
    "user assistant system",
] * 20
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]


def _train_backend() -> tokenizers.Tokenizer:
    """A ~300-entry byte-level BPE, the same kind of tokenizer as SmolLM2's."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return backend


@pytest.fixture(scope="module")
def backend() -> tokenizers.Tokenizer:
    return _train_backend()


def _write_checkpoint(directory: Path, backend: tokenizers.Tokenizer, **config: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def test_directory_round_trip_and_eos(tmp_path: Path, backend: tokenizers.Tokenizer) -> None:
    directory = _write_checkpoint(tmp_path / "model", backend)
    (directory / "config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tokenizer = load_tokenizer(directory)
    im_end = backend.token_to_id("<|im_end|>")
    assert tokenizer.eos_token_ids == (im_end, 0)  # named token first, duplicates dropped
    assert tokenizer.vocab_size == backend.get_vocab_size()
    text = "The capital of France is Paris."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # Special tokens in the ids never reach the user's text.
    assert tokenizer.decode([backend.token_to_id("<|im_start|>"), *tokenizer.encode("Hi")]) == "Hi"


def test_directory_chat_prompt(tmp_path: Path, backend: tokenizers.Tokenizer) -> None:
    tokenizer = load_tokenizer(_write_checkpoint(tmp_path / "model", backend))
    prompt = tokenizer.apply_chat_template(CONVERSATION)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode_chat(CONVERSATION)
    assert ids[0] == backend.token_to_id("<|im_start|>")
    assert ids.count(backend.token_to_id("<|im_end|>")) == 2
    assert ids == backend.encode(prompt, add_special_tokens=False).ids


def test_bos_added_only_when_asked(tmp_path: Path, backend: tokenizers.Tokenizer) -> None:
    bos = backend.token_to_id("<|endoftext|>")
    plain_directory = _write_checkpoint(tmp_path / "plain", backend, bos_token="<|endoftext|>")
    plain = load_tokenizer(plain_directory)
    assert plain.bos_token_id == bos
    assert plain.encode("Hello")[0] != bos
    with_bos = load_tokenizer(_write_checkpoint(
        tmp_path / "bos", backend, bos_token={"content": "<|endoftext|>"}, add_bos_token=True,
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    ))
    assert with_bos.encode("Hello")[0] == bos
    # The template writes BOS itself; encode_chat must not add a second one.
    chat_ids = with_bos.encode_chat([{"role": "user", "content": "Hello"}])
    assert chat_ids[0] == bos and chat_ids[1] != bos


def test_chat_template_sources(tmp_path: Path, backend: tokenizers.Tokenizer) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    directory = _write_checkpoint(tmp_path / "model", backend, chat_template=named)
    assert load_tokenizer(directory).apply_chat_template(CONVERSATION) == "DEFAULT"
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
    assert load_tokenizer(directory).apply_chat_template(CONVERSATION) == "JSON"
    (directory / "chat_template.jinja").write_text("JINJA")
    assert load_tokenizer(directory).apply_chat_template(CONVERSATION) == "JINJA"


def test_chat_template_helpers(tmp_path: Path, backend: tokenizers.Tokenizer) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ add_generation_prompt }}"
    )
    tokenizer = load_tokenizer(_write_checkpoint(tmp_path / "m", backend, chat_template=template))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "<b>é</b>"}])
    # Not HTML-escaped, not ASCII-escaped: what transformers' tojson gives.
    assert rendered == '[{"role": "user", "content": "<b>é</b>"}]|4|True'
    with pytest.raises(ValueError, match="user first"):
        tokenizer.apply_chat_template(CONVERSATION)


def test_chatml_fallback_without_template(tmp_path: Path, backend: tokenizers.Tokenizer) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    tokenizer = load_tokenizer(directory)
    assert not tokenizer.has_own_chat_template
    assert tokenizer.apply_chat_template(CONVERSATION).endswith("<|im_start|>assistant\n")


def _write_gguf(path: Path, backend: tokenizers.Tokenizer, model: str, pre: str) -> Path:
    vocab = backend.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [" ".join(pair) for pair in json.loads(backend.to_str())["model"]["merges"]]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_eot_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(CHATML_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_byte_level_matches_tokenizer_json(
    tmp_path: Path, backend: tokenizers.Tokenizer
) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", backend, "gpt2", "gpt-2")
    assert read_gguf_header(path).metadata["tokenizer.ggml.pre"] == "gpt-2"
    tokenizer = load_tokenizer(path)
    vocab = backend.get_vocab()
    assert tokenizer.eos_token_ids == (vocab["<|im_end|>"], vocab["<|endoftext|>"])
    assert tokenizer.bos_token_id == vocab["<|im_start|>"]
    for text in CORPUS[:4] + ["  odd   spacing\n\nand ünïcode 🎉"]:
        assert tokenizer.encode(text) == backend.encode(text).ids
        assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = tokenizer.apply_chat_template(CONVERSATION)
    assert tokenizer.encode_chat(CONVERSATION) == backend.encode(prompt).ids


@pytest.mark.parametrize(("model", "pre", "named"), [("t5", "default", "'t5'"),
                                                     ("gpt2", "made-up", "'made-up'")])
def test_gguf_unsupported_tokenizer(
    tmp_path: Path, backend: tokenizers.Tokenizer, model: str, pre: str, named: str
) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf", backend, model, pre)
    with pytest.raises(ModelError, match=named):
        load_tokenizer(path)


def test_not_a_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="not a GGUF"):
        load_tokenizer(junk)
    with pytest.raises(ModelError, match="no model"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
