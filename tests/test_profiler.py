"""The per-node compute profile (worker/profiler.py) on tiny random checkpoints of every family and
on the default GGUF: one positive entry per layer, experts only on MoE layers, quantization read
from config / header, the on-node cache, and that no weight is ever read. Nothing asserts how fast
anything is: this machine is shared and noisy (the one comparison has a margin of ~6x)."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import pytest
from tiny_models import FAMILIES, make_tiny_checkpoint

from pomona.fetch import default_model_path
from worker import profiler
from worker.families import adapter_for
from worker.families.base import child
from worker.profiler import MAX_REPEATS, MIN_SAMPLE_S, measure_s, profile_compute, profile_compute_cached

FAST = {"prefill_chunk_tokens": 16, "short_context": 8, "long_context": 64, "time_budget_s": 5.0}
# Routed-expert layers of each tiny family (see tests/tiny_models.py); None = every layer.
MOE_LAYERS = {"llama": set(), "llama4": {1, 3, 5, 7}, "mixtral": None, "qwen3_moe": None,
              "deepseek_v3": {1, 2, 3}}  # fmt: skip


@pytest.fixture
def measure_calls(monkeypatch):
    """Counts the profiler's timed measurements (each still runs for real)."""
    calls = []

    def counted(fn, budget_s):
        calls.append(budget_s)
        return measure_s(fn, budget_s)

    monkeypatch.setattr(profiler, "measure_s", counted)
    return calls


def _text_config(path):
    config = json.loads((path / "config.json").read_text())
    return config.get("text_config", config)


@pytest.mark.parametrize("name", [*FAMILIES, "mixtral-q4", "llama-bf16"])
def test_profile_has_one_positive_entry_per_layer(family_checkpoints, name, tmp_path):
    path = family_checkpoints[name]
    config = _text_config(path)
    profile = profile_compute(path, cache_dir=tmp_path, **FAST)

    num_layers = config["num_hidden_layers"]
    assert profile.num_layers == num_layers
    assert (profile.short_context, profile.long_context, profile.prefill_chunk_tokens) == (8, 64, 16)
    for times in (profile.decode_layer_s, profile.decode_layer_long_s, profile.prefill_layer_s):
        assert len(times) == num_layers and all(t > 0 for t in times)
    assert profile.embed_s > 0 and profile.head_s > 0
    assert profile.source == "measured"

    expected = MOE_LAYERS[name.split("-")[0]]
    expected = set(range(num_layers)) if expected is None else expected
    assert {i for i, s in enumerate(profile.expert_s) if s > 0} == expected
    assert all(s == 0 for i, s in enumerate(profile.expert_s) if i not in expected)
    assert profile.experts_per_token == (config["num_experts_per_tok"] if expected else 0)


def test_same_kind_layers_share_one_measurement(family_checkpoints, tmp_path, measure_calls):
    # llama4 (8 layers): chunked dense, chunked MoE and global-NoPE MoE layers are three kinds.
    profile = profile_compute(family_checkpoints["llama4"], cache_dir=tmp_path, **FAST)
    assert len(set(profile.decode_layer_s)) <= 3
    assert profile.decode_layer_s[0] == profile.decode_layer_s[2] == profile.decode_layer_s[6]
    assert profile.decode_layer_s[3] == profile.decode_layer_s[7]
    assert len(measure_calls) == 2 + 3 * 3 + 2  # embed, head; 3 per kind; an expert per MoE kind


def test_long_context_decode_costs_more_than_short(tmp_path):
    # Attention over 16k cached tokens is ~6x a tiny layer's whole short-context cost here.
    path = make_tiny_checkpoint("llama", tmp_path / "model", num_layers=2, max_position_embeddings=32768)
    profile = profile_compute(path, prefill_chunk_tokens=16, short_context=16, long_context=16384,
                              cache_dir=tmp_path / "cache", time_budget_s=20.0)  # fmt: skip
    assert all(long > short for short, long in zip(profile.decode_layer_s, profile.decode_layer_long_s))


def test_contexts_are_capped_at_the_model_context_length(family_checkpoints, tmp_path):
    profile = profile_compute(family_checkpoints["llama"], prefill_chunk_tokens=16, short_context=4096,
                              long_context=10**6, cache_dir=tmp_path, time_budget_s=5.0)  # fmt: skip
    assert profile.short_context == profile.long_context == 2048  # max_position_embeddings


def test_second_call_is_served_from_the_cache(family_checkpoints, tmp_path, measure_calls):
    path = family_checkpoints["mixtral"]
    first, cached = profile_compute_cached(path, cache_dir=tmp_path, **FAST)
    measured = len(measure_calls)
    assert not cached and measured > 0
    assert len(list(tmp_path.glob("*.json"))) == 1

    second, cached = profile_compute_cached(path, cache_dir=tmp_path, **FAST)
    assert cached and second == first and len(measure_calls) == measured
    assert profile_compute(path, cache_dir=tmp_path, **FAST) == first
    assert len(measure_calls) == measured

    # Other parameters are another profile.
    profile_compute(path, cache_dir=tmp_path, **{**FAST, "long_context": 32})
    assert len(measure_calls) > measured and len(list(tmp_path.glob("*.json"))) == 2


def test_cache_misses_on_another_machine_or_an_unreadable_entry(family_checkpoints, tmp_path, measure_calls,
                                                                monkeypatch):  # fmt: skip
    path = family_checkpoints["llama"]
    profile_compute(path, cache_dir=tmp_path, **FAST)
    measured = len(measure_calls)

    monkeypatch.setattr(profiler.platform, "processor", lambda: "some-other-chip")
    profile_compute(path, cache_dir=tmp_path, **FAST)
    assert len(measure_calls) > measured
    measured = len(measure_calls)

    for entry in tmp_path.glob("*.json"):
        entry.write_text("{not json")
    profile_compute(path, cache_dir=tmp_path, **FAST)
    assert len(measure_calls) > measured


def test_default_cache_dir_follows_pomona_cache(family_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("POMONA_CACHE", str(tmp_path))
    profile_compute(family_checkpoints["llama"], **FAST)
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_profile_never_reads_weights(tmp_path, monkeypatch, damage):
    path = make_tiny_checkpoint("mixtral", tmp_path / "model", quantize_bits=4)
    weights = path / "model.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(b"\xff" * 64)

    def no_load(*args, **kwargs):
        raise AssertionError("the profiler loaded tensors")

    monkeypatch.setattr(mx, "load", no_load)
    profile = profile_compute(path, cache_dir=tmp_path / "cache", **FAST)
    assert profile.num_layers == 4 and all(s > 0 for s in profile.expert_s)


def test_quantization_without_headers_matches_the_saved_one(tmp_path):
    # With readable safetensors headers, the modules that have saved scales are quantized; without
    # them, mlx_lm.convert's rule. For the tiny 4-bit checkpoint both must give the same modules.
    intact = make_tiny_checkpoint("qwen3_moe", tmp_path / "intact", quantize_bits=4)
    bare = make_tiny_checkpoint("qwen3_moe", tmp_path / "bare", quantize_bits=4)
    (bare / "model.safetensors").unlink()
    with_headers, without = profiler._read_checkpoint(intact), profiler._read_checkpoint(bare)
    model = with_headers.build()
    modules = [(p, m) for p, m in model.named_modules() if hasattr(m, "to_quantized")]
    assert modules and all(with_headers.quantize(p, m) for p, m in modules)
    assert [with_headers.quantize(p, m) for p, m in modules] == [without.quantize(p, m) for p, m in modules]
    assert with_headers.float_dtype(model, "model.norm.weight") == mx.float32  # torch_dtype


def test_deepseek_keeps_its_correction_bias_in_float32(tmp_path):
    path = make_tiny_checkpoint("deepseek_v3", tmp_path / "model", dtype="bfloat16")
    checkpoint = profiler._read_checkpoint(path)
    model = checkpoint.build()
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert checkpoint.float_dtype(model, bias) == mx.float32
    assert checkpoint.float_dtype(model, "model.layers.1.input_layernorm.weight") == mx.bfloat16
    assert child(model, adapter_for(model, "deepseek_v3").expert_module_path(1)) is not None


def test_measure_repeats_fewer_times_when_the_budget_is_short():
    calls = []
    started = time.perf_counter()
    assert measure_s(lambda: calls.append(1), budget_s=1e9) >= 0
    # warm-up, then MAX_REPEATS samples of back-to-back calls lasting MIN_SAMPLE_S each
    assert time.perf_counter() - started >= MAX_REPEATS * MIN_SAMPLE_S
    assert len(calls) > 1 + MAX_REPEATS
    calls.clear()
    measure_s(lambda: calls.append(1), budget_s=0.0)
    assert len(calls) == 1  # the warm-up alone spent the budget


def test_a_sample_is_the_sustained_time_per_call():
    # A call that is slow every fourth time (a rationed CPU): the profile shows the average.
    calls = []

    def rationed() -> None:
        calls.append(1)
        time.sleep(0.004 if len(calls) % 4 == 0 else 0.0)

    assert measure_s(rationed, budget_s=10) == pytest.approx(0.001, rel=0.5)


GGUF = default_model_path()
needs_gguf = pytest.mark.skipif(not GGUF.is_file(), reason="default model not fetched (pomona fetch)")


@needs_gguf
def test_gguf_quantization_comes_from_the_header():
    checkpoint = profiler._read_checkpoint("default")
    assert checkpoint.quantize("model.layers.0.self_attn.q_proj", None) == {"group_size": 32, "bits": 4}
    assert checkpoint.quantize("model.embed_tokens", None) == {"group_size": 32, "bits": 8}  # Q8_0
    assert checkpoint.quantize("model.layers.0.input_layernorm", None) is False
    assert checkpoint.float_dtype(None, "model.layers.0.input_layernorm.weight") == mx.float32
    assert checkpoint.float_dtype(None, "model.layers.0.mlp.up_proj.scales") == mx.float16
    assert checkpoint.identity["config"]["num_hidden_layers"] == 30


@needs_gguf
def test_default_gguf_profile(tmp_path, monkeypatch):
    monkeypatch.setattr(mx, "load", lambda *a, **k: pytest.fail("the profiler loaded tensors"))
    profile = profile_compute("default", prefill_chunk_tokens=32, short_context=16, long_context=128,
                              cache_dir=tmp_path, time_budget_s=20.0)  # fmt: skip
    assert profile.num_layers == 30
    assert all(t > 0 for t in (*profile.decode_layer_s, *profile.prefill_layer_s, profile.head_s))
    assert profile.expert_s == (0.0,) * 30 and profile.experts_per_token == 0
