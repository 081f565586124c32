"""Qwen3-MoE: qk-norm attention with a normalized top-k MoE (dense MLP on ``mlp_only_layers``)."""

from .base import FamilyAdapter


class Qwen3MoeAdapter(FamilyAdapter):
    pass
