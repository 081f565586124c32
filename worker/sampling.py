"""Token sampling on the last stage: temperature, top-p, top-k, min-p, with a per-request seed.

Filters are mlx-lm's own (``mlx_lm.sample_utils``), applied in mlx-lm's order. Each request owns
its PRNG key, so concurrent requests do not disturb each other's random streams and a fixed seed
reproduces the same output run after run.

With ``logprobs`` set, the sampler also reports the sampled token's log-probability and the most
likely alternatives (``top_logprobs``) of the model's own distribution (before temperature and
filters, as OpenAI's API reports them): a few numbers per token, never the logits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float  # of the sampled token
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed)

    def __call__(self, logits: mx.array) -> int:
        """``logits`` ``[vocab]`` -> the next token id."""
        config = self.config
        if config.temperature <= 0:
            return int(mx.argmax(logits).item())
        logprobs = (logits - mx.logsumexp(logits, keepdims=True))[None].astype(mx.float32)
        if 0 < config.top_p < 1.0:
            logprobs = apply_top_p(logprobs, config.top_p)
        if config.min_p > 0:
            logprobs = apply_min_p(logprobs, config.min_p)
        if config.top_k > 0:
            logprobs = apply_top_k(logprobs, config.top_k)
        self._key, subkey = mx.random.split(self._key)
        token = mx.random.categorical(logprobs * (1 / config.temperature), key=subkey)
        return int(token.item())

    def report(self, logits: mx.array, token: int) -> TokenLogprobs | None:
        """The log-probabilities asked for at this position (None when none were)."""
        if not self.config.logprobs:
            return None
        logprobs = (logits - mx.logsumexp(logits, keepdims=True)).astype(mx.float32)  # [vocab]
        count = min(max(self.config.top_logprobs, 0), MAX_TOP_LOGPROBS, logprobs.shape[-1])
        if count == 0:
            return TokenLogprobs(logprobs[token].item(), ())
        top_ids = mx.argpartition(-logprobs, count - 1)[:count]
        top_values = logprobs[top_ids]
        order = mx.argsort(-top_values)
        top_ids, top_values = top_ids[order].tolist(), top_values[order].tolist()
        return TokenLogprobs(logprobs[token].item(), tuple(zip(top_ids, top_values)))
