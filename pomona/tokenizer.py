"""Tokenizers for the coordinator: text <-> token ids, and chat templates, without MLX.

A model's tokenizer comes from one of two places:

- a GGUF file: llama.cpp stores the vocabulary, merges (or SentencePiece scores), special-token
  ids and chat template as metadata; we rebuild the byte-level BPE or SentencePiece tokenizer they
  describe with the ``tokenizers`` library (byte-level BPE matched llama.cpp on every string
  tried; SentencePiece matches the ``sentencepiece`` library in the tests);
- a checkpoint directory: ``tokenizer.json`` plus ``tokenizer_config.json`` (and ``config.json``,
  ``generation_config.json``, ``chat_template.jinja`` / ``chat_template.json`` when present).

Chat templates are rendered the way transformers renders them (sandboxed Jinja, ``trim_blocks``
and ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``), so a
prompt tokenizes to the same ids as ``tokenizer.apply_chat_template(..., tokenize=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from pomona.errors import ModelError
from pomona.gguf_header import read_gguf_header

# Used when a model ships no chat template. ChatML is what most instruction-tuned open models
# (SmolLM2, Qwen) were trained on; for any other model the output will be plausible but worse.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special (never produced from user
# text by merges, dropped on decode); USER_DEFINED tokens are matched whole but decoded as text.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split regexes of the BPE pre-tokenizers llama.cpp names in ``tokenizer.ggml.pre``, transcribed
# from the models' tokenizer.json files (as transformers' GGUF support does). Only "smollm" has
# been checked against a reference tokenizer here; the others are the published patterns.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp's ``tokenizer.ggml.pre`` names, for a byte-level BPE vocab."""
    if pre == "smollm":
        # SmolLM splits every digit on its own, then applies GPT-2's regex.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported "
            "(supported: smollm, gpt-2, llama-bpe, qwen2)"
        )
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    ``encode`` tokenizes raw text the way the model's own tokenizer does by default (adding BOS
    when the model asks for it); ``encode_chat`` renders the chat template and tokenizes it
    without adding anything, because the template already writes every special token it wants.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_ids: Sequence[int],
        bos_token_id: int | None,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        add_bos_token: bool,
        use_post_processor: bool,
    ) -> None:
        self._backend = backend
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.bos_token_id = bos_token_id
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        # Fall back to ChatML rather than failing: a base model can still be prompted this way.
        self.chat_template: str = chat_template or CHATML_TEMPLATE
        self.has_own_chat_template = chat_template is not None
        self._add_bos_token = add_bos_token and bos_token_id is not None
        # tokenizer.json files may carry a post-processor (e.g. Llama 3's, which prepends BOS);
        # GGUF-built tokenizers have none and rely on add_bos_token instead.
        self._use_post_processor = use_post_processor

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text, with BOS prepended only when the model's tokenizer adds it."""
        ids = self._backend.encode(text, add_special_tokens=self._use_post_processor).ids
        if self._add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; special tokens (BOS, EOS, ChatML markers) are left out."""
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of one id (byte-level spelling), or None if out of range."""
        return self._backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending with the assistant's generation prompt.

        Raises ValueError when the template rejects the conversation (its ``raise_exception``,
        e.g. roles that do not alternate).
        """
        context: dict[str, Any] = {"messages": messages, "add_generation_prompt": True}
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        try:
            return self._compiled_template.render(**context)
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template rejected the conversation: {error}") from error

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat prompt; no BOS is added, the template holds it if wanted."""
        prompt = self.apply_chat_template(messages)
        return self._backend.encode(prompt, add_special_tokens=False).ids

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        try:
            return _chat_template_environment().from_string(self.chat_template)
        except jinja2.TemplateError as error:
            raise ModelError(f"the model's chat template does not compile: {error}") from error


def _chat_template_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A Jinja environment configured like transformers' chat-template renderer."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(format_string: str) -> str:
        return datetime.now().strftime(format_string)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


def load_tokenizer(model_path: Path) -> Tokenizer:
    """The tokenizer of a model: a ``.gguf`` file, or a checkpoint directory."""
    model_path = Path(model_path)
    if model_path.is_dir():
        return _tokenizer_from_directory(model_path)
    if model_path.is_file():
        return tokenizer_from_gguf_metadata(read_gguf_header(model_path).metadata)
    raise ModelError(f"no model at {model_path}")


def tokenizer_from_gguf_metadata(metadata: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer llama.cpp describes in GGUF metadata: byte-level BPE ("gpt2") or
    SentencePiece BPE with byte fallback ("llama")."""
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or ())
    if not tokens:
        raise ModelError("the GGUF has no vocabulary (tokenizer.ggml.tokens)")
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(token_types) != len(tokens):
        raise ModelError(f"GGUF has {len(tokens)} tokens but {len(token_types)} token types")
    # A duplicate spelling keeps its first id, as llama.cpp's text -> token map does.
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    if tokenizer_model == "gpt2":
        merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", ())]
        backend = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        )
        backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "gpt-2"))
        backend.decoder = decoders.ByteLevel()
        # llama.cpp's default for a BPE vocabulary that does not say is not to add BOS.
        add_bos_default = False
    elif tokenizer_model == "llama":
        backend = _sentencepiece_backend(metadata, tokens, vocab, token_types)
        add_bos_default = True  # llama.cpp's default for a SentencePiece vocabulary
    else:
        raise ModelError(
            f"GGUF tokenizer model {tokenizer_model!r} is not supported "
            "(supported: 'gpt2', byte-level BPE, and 'llama', SentencePiece)"
        )

    typed = list(zip(tokens, token_types, strict=True))
    control = [t for t, kind in typed if kind == _TOKEN_TYPE_CONTROL]
    user_defined = [t for t, kind in typed if kind == _TOKEN_TYPE_USER_DEFINED]
    # normalized=False: these must match the raw text exactly, as in the models' tokenizer.json.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    def token_at(key: str) -> tuple[int | None, str | None]:
        token_id = metadata.get(key)
        if token_id is None or not 0 <= int(token_id) < len(tokens):
            return None, None
        return int(token_id), tokens[int(token_id)]

    bos_token_id, bos_token = token_at("tokenizer.ggml.bos_token_id")
    eos_token_id, eos_token = token_at("tokenizer.ggml.eos_token_id")
    # Only what the metadata names as an end token: EOS, end-of-turn, end-of-message.
    end_ids = [token_at(f"tokenizer.ggml.{key}")[0] for key in ("eot_token_id", "eom_token_id")]
    eos_token_ids = [i for i in (eos_token_id, *end_ids) if i is not None]
    return Tokenizer(
        backend,
        eos_token_ids=eos_token_ids,
        bos_token_id=bos_token_id,
        bos_token=bos_token,
        eos_token=eos_token,
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        use_post_processor=False,
    )


def _sentencepiece_backend(
    metadata: dict[str, Any], tokens: list[str], vocab: dict[str, int], token_types: list[int]
) -> tokenizers.Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: the pair whose merged piece scores highest merges
    first, unknown characters fall back to <0xXX> byte tokens, spaces are "▁" (with one in front
    of the text unless ``add_space_prefix`` is false)."""
    scores = list(metadata.get("tokenizer.ggml.scores") or ())
    if len(scores) != len(tokens):
        raise ModelError(f"GGUF has {len(tokens)} tokens but {len(scores)} scores")
    # Merges from scores, as transformers rebuilds them for a GGUF: every split of a piece into
    # two pieces of the vocabulary, ranked by the merged piece's score.
    normal = {t for t, kind in zip(tokens, token_types) if kind == 1}
    merges = []
    for piece, score in zip(tokens, scores):
        if piece not in normal:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]  # fmt: skip
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, score) for left, right in splits]
    merges.sort(key=lambda merge: merge[2], reverse=True)  # stable: ties keep vocabulary order
    unknown_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unknown = tokens[int(unknown_id)] if unknown_id is not None else None
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=[(left, right) for left, right, _ in merges], unk_token=unknown,
        fuse_unk=True, byte_fallback=True,
    ))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    return backend


def _tokenizer_from_directory(directory: Path) -> Tokenizer:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelError(f"{directory} has no tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # the Rust side raises plain Exception on bad files
        raise ModelError(f"cannot read {tokenizer_file}: {error}") from error
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    model_config = _read_json(directory / "config.json")
    generation_config = _read_json(directory / "generation_config.json")

    bos_token = _token_content(tokenizer_config.get("bos_token"))
    eos_token = _token_content(tokenizer_config.get("eos_token"))
    eos_token_ids: list[int] = []
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        eos_token_ids.append(backend.token_to_id(eos_token))
    # config.json and generation_config.json may list more end tokens (e.g. Llama 3's <|eot_id|>).
    for config in (model_config, generation_config):
        eos_token_ids.extend(_as_id_list(config.get("eos_token_id")))

    bos_token_id = model_config.get("bos_token_id")
    if isinstance(bos_token_id, list):
        bos_token_id = bos_token_id[0] if bos_token_id else None
    if bos_token_id is None and bos_token is not None:
        bos_token_id = backend.token_to_id(bos_token)
    if bos_token is None and bos_token_id is not None:
        bos_token = backend.id_to_token(bos_token_id)

    return Tokenizer(
        backend,
        eos_token_ids=eos_token_ids,
        bos_token_id=bos_token_id,
        bos_token=bos_token,
        eos_token=eos_token,
        chat_template=_directory_chat_template(directory, tokenizer_config),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
        use_post_processor=True,
    )


def _directory_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The chat template, from the places transformers looks, newest convention first."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        # Named templates (e.g. "default", "tool_use"): a chat prompt wants the default one.
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read {path}: {error}") from error


def _token_content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)]
