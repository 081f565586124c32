"""DeepSeek-V3: MLA attention, grouped routing with shared experts, dense first layers."""

from mlx_lm.models.base import create_attention_mask

from .base import FamilyAdapter


class DeepseekV3Adapter(FamilyAdapter):
    expert_path = "mlp.switch_mlp"  # the SwitchGLU a MoE layer calls after routing
    def tied_embeddings(self, model) -> bool:
        return False  # DeepSeek-V3 always has its own lm_head

    def masks(self, model, hidden, layer_indices, caches):
        # MLA attention needs an explicit array mask, as mlx-lm's DeepseekV3Model builds it.
        mask = create_attention_mask(hidden, caches[0], return_array=True)
        return [mask] * len(layer_indices)
