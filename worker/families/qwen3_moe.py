"""Qwen3-MoE: qk-norm attention with a normalized top-k MoE (dense MLP on ``mlp_only_layers``)."""

from .base import FamilyAdapter


class Qwen3MoeAdapter(FamilyAdapter):
    expert_path = "mlp.switch_mlp"  # the SwitchGLU a MoE layer calls after routing
