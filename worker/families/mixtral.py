"""Mixtral: llama attention with a softmax top-2 sparse MoE in every layer."""

from .base import FamilyAdapter


class MixtralAdapter(FamilyAdapter):
    expert_path = "block_sparse_moe.switch_mlp"  # the SwitchGLU a MoE layer calls after routing
