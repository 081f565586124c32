"""Mixtral: llama attention with a softmax top-2 sparse MoE in every layer."""

from .base import FamilyAdapter


class MixtralAdapter(FamilyAdapter):
    pass
