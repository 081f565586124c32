"""Token sampling on the last stage: temperature, top-p, top-k, min-p, with a per-request seed.

Filters are mlx-lm's own (``mlx_lm.sample_utils``), applied in mlx-lm's order. The randomness of
the n-th generated token is a function of the request's seed and n alone, so concurrent requests do
not disturb each other, a fixed seed reproduces the same output run after run, and a request
replayed after a node failure (its prompt plus the tokens so far, starting at n = tokens so far)
continues exactly as it would have.

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


_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads positions over the key space


def position_key(seed: int, position: int) -> mx.array:
    """The PRNG key of generated token number `position` of a request seeded with `seed`."""
    return mx.random.key((seed ^ (position * _MIX)) % 2**63)


class Sampler:
    def __init__(self, config: SamplingConfig, position: int = 0):
        """position: how many tokens the request generated before this sampler's first."""
        self.config = config
        self._seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.position = position

    def __call__(self, logits: mx.array) -> int:
        """``logits`` ``[vocab]`` -> the next token id."""
        config = self.config
        position, self.position = self.position, self.position + 1
        if config.temperature <= 0:
            return int(mx.argmax(logits).item())
        logprobs = (logits - mx.logsumexp(logits, keepdims=True))[None].astype(mx.float32)
        if 0 < config.top_p < 1.0:
            logprobs = apply_top_p(logprobs, config.top_p)
        if config.min_p > 0:
            logprobs = apply_min_p(logprobs, config.min_p)
        if config.top_k > 0:
            logprobs = apply_top_k(logprobs, config.top_k)
        key = position_key(self._seed, position)
        token = mx.random.categorical(logprobs * (1 / config.temperature), key=key)
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


def sample_rows(samplers: list[Sampler], logits: mx.array) -> list[int]:
    """One token per row of ``logits`` ``[rows, vocab]``, row ``i`` by ``samplers[i]`` (a decode
    micro-batch). Greedy rows take one argmax over the rows; sampled rows each their own key."""
    greedy = [i for i, sampler in enumerate(samplers) if sampler.config.temperature <= 0]
    tokens = [0] * len(samplers)
    if greedy:
        rows = logits if len(greedy) == len(samplers) else logits[mx.array(greedy, dtype=mx.int32)]
        for i, token in zip(greedy, mx.argmax(rows, axis=-1).tolist()):
            samplers[i].position += 1
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if sampler.config.temperature > 0:
            tokens[i] = sampler(logits[i])
    return tokens
