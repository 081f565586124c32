"""GGUF beyond llama: tiny GGUF files written by the tests (tests/gguf_models.py) for every
architecture Pomona reads, served in stages and on a real cluster, against single-process mlx-lm on
the same weights dequantized by the ``gguf`` package; tensors read by offset, bit for bit as
``mx.load`` gives them; tokenizers (byte-level BPE and SentencePiece) from GGUF metadata."""

from __future__ import annotations

import io
import json
import os

import gguf
import mlx.core as mx
import numpy as np
import pytest
import sentencepiece
from cluster_helpers import running_cluster
from gguf import GGMLQuantizationType as Q
from gguf_models import dequantized_checkpoint, write_gguf
from layouts import PROMPT
from mlx.utils import tree_flatten
from tiny_models import _TRAINING_TEXT, chain_generate, make_tiny_checkpoint, reference_generate

from pomona.errors import ModelError
from pomona.gguf_header import read_gguf_header
from pomona.modelinfo import describe_model
from pomona.tokenizer import load_tokenizer, tokenizer_from_gguf_metadata
from worker import gguf_tensors, profiler
from worker.experts import ExpertStats
from worker.families.base import child
from worker.stage import load_expert_host, load_stage

# mlx-lm family -> GGUF architecture it is filed under.
FAMILIES = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}  # fmt: skip
NEW_TOKENS = 8
LAYOUTS = {2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (tiny checkpoint, its Q8_0 GGUF, prompt ids, mlx-lm's greedy tokens on the GGUF's
    weights as the gguf package dequantizes them)."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for family in FAMILIES:
        checkpoint = make_tiny_checkpoint(family, root / family, num_layers=4)
        path = write_gguf(checkpoint, root / f"{family}.gguf", Q.Q8_0)
        config = json.loads((checkpoint / "config.json").read_text())
        reference = dequantized_checkpoint(path, config, root / f"{family}-reference")
        prompt = load_tokenizer(path).encode(PROMPT)
        made[family] = checkpoint, path, prompt, reference_generate(reference, prompt, NEW_TOKENS)
    return made


@pytest.mark.parametrize("stage_count", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_stages_match_mlx_lm(models, family, stage_count):
    _, path, prompt, expected = models[family]
    _, tokens = chain_generate(path, LAYOUTS[stage_count], prompt, NEW_TOKENS)
    assert tokens == expected
    assert len(set(expected)) >= 3


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_description_and_tokenizer(models, family):
    checkpoint, path, prompt, _ = models[family]
    info, original = describe_model(str(path)), describe_model(str(checkpoint))
    assert (info.format, info.architecture, info.num_layers) == ("gguf", family, 4)
    assert (info.num_experts, info.moe_layers) == (original.num_experts, original.moe_layers)
    assert info.experts_per_token == original.experts_per_token
    # The GGUF's BPE vocabulary tokenizes as the checkpoint's tokenizer.json does.
    assert prompt == load_tokenizer(checkpoint).encode(PROMPT)
    assert load_tokenizer(path).decode(prompt) == PROMPT


def test_stage_reads_only_its_own_tensors(models, monkeypatch):
    _, path, _, _ = models["qwen3_moe"]
    offsets = {t.offset: t.name for t in read_gguf_header(path, skip_arrays=True).tensors}
    read = []
    real_pread = os.pread

    def recording_pread(fd, length, offset):
        read.append(offsets[offset])
        return real_pread(fd, length, offset)

    monkeypatch.setattr(gguf_tensors.os, "pread", recording_pread)
    load_stage(path, 1, 3, is_first=False, is_last=False)
    assert read and {name.split(".")[1] for name in read} == {"1", "2"}  # blk.1.*, blk.2.* only
    assert len(read) == len(set(read))  # each tensor once


def test_gguf_moe_on_a_cluster_with_experts_elsewhere(models, tmp_path):
    """Two stages of a MoE GGUF, half of every layer's experts on a third, expert-only node."""
    _, path, prompt, expected = models["qwen3_moe"]
    experts = [{"node": "c", "layers": [0, 4], "experts": [0, 4]}]
    with running_cluster(tmp_path, path, 3, LAYOUTS[2], experts) as cluster:
        summary = cluster.generate(PROMPT, raw=True, max_tokens=NEW_TOKENS)
        assert summary.prompt_tokens == len(prompt)
        assert list(summary.token_ids) == expected
        stats = cluster.expert_stats()
        assert any(n.node == "c" and n.stats.layers for n in stats.nodes), "c computed nothing"


def test_gguf_expert_host_holds_exactly_its_rows(models, monkeypatch):
    _, path, _, _ = models["mixtral"]
    whole = load_stage(path, 0, 4, True, True)
    module_path = whole.adapter.expert_module_path(2)
    reference = dict(tree_flatten(child(whole.model, module_path).parameters()))
    read = []
    real_pread = os.pread
    monkeypatch.setattr(gguf_tensors.os, "pread", lambda fd, n, o: read.append(n) or real_pread(fd, n, o))
    host = load_expert_host(path, {2: [1, 6]}, ExpertStats())
    module, local_index = host.modules[2]
    held = dict(tree_flatten(module.parameters()))
    assert held.keys() == reference.keys() and any(name.endswith("scales") for name in held)
    for name, array in held.items():
        assert mx.array_equal(array, reference[name][mx.array([1, 6])]).item(), name
    assert list(local_index[[1, 6]]) == [0, 1]
    expert_bytes = sum(t.nbytes for t in read_gguf_header(path).tensors if ".2.ffn_" in t.name
                       and "_exps" in t.name) // 8  # fmt: skip
    assert sum(read) == 2 * expert_bytes  # two experts' rows of the three projections, no more


def test_profiler_reads_a_moe_gguf(models, tmp_path):
    _, path, _, _ = models["qwen2_moe"]
    profile = profiler.profile_compute(
        path, prefill_chunk_tokens=8, short_context=4, long_context=16, cache_dir=tmp_path,
        time_budget_s=1.0,
    )
    assert len(profile.decode_layer_s) == 4 and all(s > 0 for s in profile.expert_s)


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_tensor_reader_matches_mx_load(tmp_path, kind):
    path = tmp_path / "tensors.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.normal(size=(4, 64)), "b.weight": rng.normal(size=(3, 2, 96))}
    for name, array in arrays.items():
        array = array.astype(np.float32 if kind != Q.F16 else np.float16)
        if kind in (Q.F32, Q.F16):
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = mx.load(str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        for tensor in read_gguf_header(path).tensors:
            for suffix, array in gguf_tensors.read_tensor(fd, tensor).items():
                reference = expected[tensor.name.replace(".weight", f".{suffix}")]
                assert array.dtype == reference.dtype and array.shape == reference.shape
                assert mx.array_equal(array, reference).item(), (tensor.name, suffix)
    finally:
        os.close(fd)


@pytest.mark.parametrize("architecture, tensor, message", [
    ("falcon", "token_embd.weight", "GGUF architecture 'falcon' is not supported"),
    ("llama", "blk.0.ffn_gate.3.weight", "stores each expert as its own tensor"),
])  # fmt: skip
def test_unservable_gguf(tmp_path, architecture, tensor, message):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor(tensor, np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=message):
        load_stage(path, 0, 1, True, True)


def _sentencepiece_metadata():
    """A SentencePiece BPE model trained like Llama's (identity normalization, byte fallback),
    and its vocabulary as llama.cpp's converter writes it into GGUF metadata."""
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TRAINING_TEXT.splitlines() * 3), model_writer=proto,
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        hard_vocab_limit=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2,
    )
    model = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    ids = range(model.get_piece_size())
    kinds = [2 if model.is_unknown(i) else 3 if model.is_control(i) else 6 if model.is_byte(i)
             else 5 if model.is_unused(i) else 1 for i in ids]  # fmt: skip
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [model.id_to_piece(i) for i in ids],
        "tokenizer.ggml.scores": [model.get_score(i) for i in ids],
        "tokenizer.ggml.token_type": kinds,
        "tokenizer.ggml.bos_token_id": model.bos_id(),
        "tokenizer.ggml.eos_token_id": model.eos_id(),
        "tokenizer.ggml.unknown_token_id": model.unk_id(),
    }
    return model, metadata


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.", "Hello, world!  Two  spaces", " leading space",
    "ünïcödé ✓ 東京 and émojis 🎉", "machine learning models\nnew line 2026",
])  # fmt: skip
def test_sentencepiece_tokenizer_matches_sentencepiece(text):
    model, metadata = _sentencepiece_metadata()
    tokenizer = tokenizer_from_gguf_metadata(metadata)
    ids = tokenizer.encode(text)
    assert ids == [model.bos_id(), *model.encode(text)]  # llama.cpp adds BOS for SentencePiece
    assert tokenizer.decode(ids) == model.decode(ids) == text
    assert tokenizer.eos_token_ids == (model.eos_id(),)
