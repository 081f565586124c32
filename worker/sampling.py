"""Token sampling on the last stage: temperature, top-p, top-k, min-p, with a per-request seed.

Filters are mlx-lm's own (``mlx_lm.sample_utils``), applied in mlx-lm's order. Each request owns
its PRNG key, so concurrent requests do not disturb each other's random streams and a fixed seed
reproduces the same output run after run.
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
