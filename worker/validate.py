"""Checks on what reaches a worker, before any of it is used: every field of a data-plane message,
an expert request, or a control call, against the loaded model and this worker's limits.

Two kinds of failure, so that a bad message costs no one else anything:
- a message that cannot belong to any request (a malformed or duplicate request id, no body)
  closes the stream it came on, with INVALID_ARGUMENT (``stream_problem``);
- a bad field of a real request (a token id outside the vocabulary, a tensor of the wrong shape,
  dtype or size, NaN activations, out-of-range sampling) fails that request alone with
  ``BadInput``, which names the field and the allowed range.
Pure functions over protos and numbers; numpy only for the finite-values check.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from pomona.errors import PomonaError

REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_BF16_EXPONENT = np.uint16(0x7F80)  # all exponent bits set: inf or NaN
MAX_PROMPT_TOKENS = 1 << 20
MAX_BATCH_ROWS = 1024  # requests in one decode step
MAX_LINK_TARGETS = 64
MAX_PROBE_ROUNDS = 10_000
MAX_PROBE_TIMEOUT_S = 600.0


class BadInput(PomonaError, ValueError):
    """A field of a request that the model cannot take; fails that request alone."""


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded shard accepts: from the model's config and the worker's message cap.
    A size the config does not give is 0, and what depends on it is not checked."""

    vocab_size: int
    hidden_size: int
    max_message_bytes: int

    @property
    def max_tokens_per_message(self) -> int:
        """Tokens of hidden states (float32 at worst) that fit one message."""
        return max(1, self.max_message_bytes // (4 * max(self.hidden_size, 1)))


def _model_arg(args, name: str) -> int:
    value = getattr(args, name, None)
    if value is None:  # llama4 and other multimodal configs nest the text model's settings
        text = getattr(args, "text_config", None)
        value = text.get(name) if isinstance(text, dict) else getattr(text, name, None)
    return int(value or 0)


def model_limits(model, max_message_bytes: int) -> ModelLimits:
    args = getattr(model, "args", None)
    return ModelLimits(_model_arg(args, "vocab_size"), _model_arg(args, "hidden_size"), max_message_bytes)


def stream_problem(message) -> str:
    """Why a StageMessage cannot belong to any request ("" if it can)."""
    if not REQUEST_ID.fullmatch(message.request_id):
        shown = message.request_id[:40] + ("..." if len(message.request_id) > 40 else "")
        return (f"request id {shown!r} is not 1-128 characters of letters, digits and _ . : -; "
                "closing this stream")
    if message.WhichOneof("body") is None:
        return f"message for request {message.request_id!r} has no body (start, activations, ...)"
    return ""


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise BadInput(f"{name} must be a finite number, got {value}")
    return value


def check_token(token_id: int, limits: ModelLimits, what: str = "token id") -> None:
    if token_id < 0 or (limits.vocab_size and token_id >= limits.vocab_size):
        raise BadInput(f"{what} {token_id} is outside the vocabulary (0 to {limits.vocab_size - 1})")


MAX_EVICTED_ENTRIES = 65536  # prompt cache entries one start may evict


def check_start(start, limits: ModelLimits, is_first: bool) -> None:
    """A StartRequest: prompt (first stage), sampling, stop ids, chunk size."""
    if is_first:
        if not start.prompt_token_ids:
            raise BadInput("empty prompt: a request needs at least one prompt token")
        if len(start.prompt_token_ids) > MAX_PROMPT_TOKENS:
            count = len(start.prompt_token_ids)
            raise BadInput(f"the prompt has {count} tokens; at most {MAX_PROMPT_TOKENS}")
        ids = np.asarray(start.prompt_token_ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= (limits.vocab_size or np.iinfo(np.int64).max))]
        if bad.size:
            check_token(int(bad[0]), limits, "prompt token id")
    if start.max_tokens < 1:
        raise BadInput(f"max_tokens must be at least 1, got {start.max_tokens}")
    for token_id in start.eos_token_ids:
        check_token(token_id, limits, "end-of-sequence token id")
    most = limits.max_tokens_per_message
    if not 0 <= start.prefill_chunk_tokens <= most:
        raise BadInput(f"prefill_chunk_tokens must be between 1 and {most} (this worker's message "
                       f"cap), got {start.prefill_chunk_tokens}")
    if not 0 <= start.max_batch <= MAX_BATCH_ROWS:
        raise BadInput(f"max_batch must be between 1 and {MAX_BATCH_ROWS}, got {start.max_batch}")
    if start.reuse_tokens < 0 or bool(start.reuse_tokens) != bool(start.reuse_entry):
        raise BadInput("a start reuses a prompt cache entry with a positive token count, or none: got "
                       f"entry {start.reuse_entry[:40]!r} with {start.reuse_tokens} tokens")
    if len(start.evict) > MAX_EVICTED_ENTRIES:
        raise BadInput(f"a start evicts at most {MAX_EVICTED_ENTRIES} prompt cache entries, "
                       f"got {len(start.evict)}")
    entries = [*start.evict, *([start.reuse_entry] if start.reuse_entry else [])]
    if bad := next((entry for entry in entries if not REQUEST_ID.fullmatch(entry)), None):
        raise BadInput(f"prompt cache entry {bad[:40]!r} is not a request id")
    sampling = start.sampling
    if _finite("temperature", sampling.temperature) < 0:
        raise BadInput(f"temperature must be >= 0, got {sampling.temperature}")
    for name in ("top_p", "min_p"):
        if not 0 <= _finite(name, getattr(sampling, name)) <= 1:
            raise BadInput(f"{name} must be between 0 and 1, got {getattr(sampling, name)}")
    if sampling.top_k < 0 or (limits.vocab_size and sampling.top_k > limits.vocab_size):
        raise BadInput(f"top_k must be between 0 and the vocabulary size {limits.vocab_size}, "
                       f"got {sampling.top_k}")


def check_hidden(tensor, width: int, max_rows: int, rank: int = 3) -> None:
    """Hidden states: ``[1, tokens, width]`` (rank 3) or ``[rows, width]`` (rank 2), a float dtype,
    1 to ``max_rows`` tokens, exactly the bytes the shape needs, and no inf or NaN."""
    numpy_dtype = _float_dtype(tensor)
    shape = list(tensor.shape)
    expected = "[1, tokens, {w}]" if rank == 3 else "[rows, {w}]"
    if (len(shape) != rank or (width and shape[-1] != width) or (rank == 3 and shape[0] != 1)
            or not 1 <= shape[-2] <= max_rows):
        raise BadInput(f"hidden states must have shape {expected.format(w=width)} with 1 to "
                       f"{max_rows} tokens, got {shape}")
    _check_values(tensor, shape, numpy_dtype)


def check_decode_step(step, width: int) -> None:
    """A decode step: 1 to MAX_BATCH_ROWS distinct valid request ids, hidden ``[rows, 1, width]``."""
    _check_rows(list(step.request_ids), step.hidden, width, "a decode step", 1)


def check_prefill_rows(rows, width: int, max_tokens: int) -> None:
    """Prompts prefilled together: distinct valid request ids, one length (1 to the row width) per
    row, hidden ``[rows, tokens, width]`` with 1 to ``max_tokens`` tokens."""
    ids, lengths = list(rows.request_ids), list(rows.lengths)
    tokens = (list(rows.hidden.shape) + [0, 0])[1]
    if not 1 <= tokens <= max_tokens:
        raise BadInput(f"prompts prefilled together must have 1 to {max_tokens} tokens, got {tokens}")
    if len(lengths) != len(ids) or any(not 1 <= n <= tokens for n in lengths):
        raise BadInput(f"prompts prefilled together need one length from 1 to {tokens} per request")
    _check_rows(ids, rows.hidden, width, "a prefill of several prompts", tokens)


def _check_rows(ids: list[str], tensor, width: int, what: str, tokens: int) -> None:
    if not 1 <= len(ids) <= MAX_BATCH_ROWS or len(set(ids)) != len(ids):
        raise BadInput(f"{what} names 1 to {MAX_BATCH_ROWS} distinct requests, got {len(ids)}")
    bad = next((request_id for request_id in ids if not REQUEST_ID.fullmatch(request_id)), None)
    if bad is not None:
        raise BadInput(f"{what} names request id {bad[:40]!r}, which is not 1-128 characters "
                       "of letters, digits and _ . : -")
    numpy_dtype = _float_dtype(tensor)
    shape = list(tensor.shape)
    if shape != [len(ids), tokens, width or (shape or [0])[-1]]:
        raise BadInput(f"hidden states of {what} of {len(ids)} requests must have shape "
                       f"[{len(ids)}, {tokens}, {width}], got {shape}")
    _check_values(tensor, shape, numpy_dtype)


def _float_dtype(tensor):
    numpy_dtype = FLOAT_DTYPES.get(tensor.dtype)
    if numpy_dtype is None:
        raise BadInput(f"hidden states must be one of {sorted(FLOAT_DTYPES)}, "
                       f"got dtype {tensor.dtype!r}")
    return numpy_dtype


def _check_values(tensor, shape: list[int], numpy_dtype) -> None:
    itemsize = np.dtype(numpy_dtype).itemsize
    if len(tensor.data) != math.prod(shape) * itemsize:
        raise BadInput(f"hidden states of shape {shape} and dtype {tensor.dtype} need "
                       f"{math.prod(shape) * itemsize} bytes, got {len(tensor.data)}")
    values = np.frombuffer(tensor.data, dtype=numpy_dtype)
    finite = ((values & _BF16_EXPONENT) != _BF16_EXPONENT).all() if tensor.dtype == "bfloat16" else (
        np.isfinite(values).all())
    if not finite:
        raise BadInput("hidden states contain inf or NaN values")


def expert_request_problem(request, host, max_message_bytes: int) -> str:
    """Why an ExpertRequest cannot run on the experts ``host`` holds ("" if it can)."""
    if host is None:
        return "this node holds no experts"
    if request.layer not in host.modules:
        return (f"this node holds no experts of layer {request.layer} "
                f"(it holds layers {sorted(host.modules)})")
    module, local_index = host.modules[request.layer]
    down = getattr(module, "down_proj", None)
    width = int(down.weight.shape[1]) if down is not None and hasattr(down, "weight") else 0
    width = width or (list(request.hidden.shape) or [0])[-1]  # unknown: the module will check
    max_rows = max(1, max_message_bytes // (4 * max(width, 1)))
    try:
        check_hidden(request.hidden, width, max_rows, rank=2)
    except BadInput as error:
        return str(error)
    rows, pairs = request.hidden.shape[0], len(request.pair_rows)
    if pairs != len(request.pair_experts) or not 1 <= pairs <= max_rows * len(local_index):
        return (f"pair_rows ({pairs}) and pair_experts ({len(request.pair_experts)}) must be equally "
                f"long, 1 to {max_rows * len(local_index)} pairs")
    pair_rows = np.asarray(request.pair_rows, dtype=np.int64)
    if (pair_rows < 0).any() or (pair_rows >= rows).any():
        return f"pair_rows must index the {rows} rows of hidden (0 to {rows - 1})"
    experts = np.asarray(request.pair_experts, dtype=np.int64)
    if (experts < 0).any() or (experts >= len(local_index)).any():
        return f"expert ids must be between 0 and {len(local_index) - 1}"
    return ""


def on_ring(request) -> bool:
    """Whether a LoadShard puts this node's stage on an mx.distributed ring (``mlx-ring``)."""
    return request.transport == "mlx-ring" and request.stage_count > 1 and not request.experts_only


def load_problem(request, loaded) -> str:
    """Why a LoadShard cannot run now ("" if it can)."""
    if loaded is not None:
        layers = f"layers [{loaded.layer_start}, {loaded.layer_end})"
        what = "experts" if loaded.experts_only else layers
        return (f"this worker already holds {what} of {loaded.model_path}; a worker loads once "
                "(call Release first)")
    if not request.model_path:
        return "model_path is empty"
    if not request.experts_only:
        if not 0 <= request.layer_start < request.layer_end:
            return f"layers [{request.layer_start}, {request.layer_end}) are not a range of layers"
        if not 0 <= request.stage_index < max(request.stage_count, 1):
            return f"stage_index {request.stage_index} is not within stage_count {request.stage_count}"
        if request.stage_count > 1 and not request.next_address:
            return "a stage of a ring of several needs next_address"
    if request.transport not in ("", "grpc", "mlx-ring"):
        return f"unknown transport {request.transport!r} (grpc or mlx-ring)"
    if on_ring(request):
        if len(request.ring_hosts) != request.stage_count:
            return (f"the mlx-ring transport needs one ring host per stage: {len(request.ring_hosts)} "
                    f"for {request.stage_count} stages")
    return ""


MAX_PROFILE_CONTEXT = 1 << 17
MAX_PROFILE_BUDGET_S = 600.0


def profile_problem(request) -> str:
    contexts = (request.short_context, request.long_context, request.prefill_chunk_tokens)
    if not all(0 <= c <= MAX_PROFILE_CONTEXT for c in contexts):
        return f"contexts and prefill_chunk_tokens must be between 0 and {MAX_PROFILE_CONTEXT}"
    if not 0 <= request.time_budget_s <= MAX_PROFILE_BUDGET_S:
        return f"time_budget_s must be between 0 and {MAX_PROFILE_BUDGET_S:g}"
    return ""


def measure_problem(request, max_message_bytes: int) -> str:
    if len(request.targets) > MAX_LINK_TARGETS:
        return f"at most {MAX_LINK_TARGETS} targets per call, got {len(request.targets)}"
    if not 0 <= request.small_bytes <= request.large_bytes < max_message_bytes:
        return (f"need 0 <= small_bytes <= large_bytes < {max_message_bytes} (the message cap), "
                f"got {request.small_bytes} and {request.large_bytes}")
    rounds = (request.small_rounds, request.large_rounds)
    if not all(0 <= r <= MAX_PROBE_ROUNDS for r in rounds):
        return f"rounds must be between 0 and {MAX_PROBE_ROUNDS}"
    if not 0 < request.timeout_s <= MAX_PROBE_TIMEOUT_S:
        return f"timeout_s must be in (0, {MAX_PROBE_TIMEOUT_S:g}], got {request.timeout_s}"
    return ""
