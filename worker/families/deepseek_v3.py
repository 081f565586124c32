"""DeepSeek-V3 (and the MLA families built like it): why the generic adapter is not enough.

mlx-lm's DeepseekV3Model builds its mask with ``create_attention_mask(..., return_array=True)``:
its MLA attention adds the mask to the scores itself, so the "causal" shortcut the other families
pass would not do. Everything else (embedding, layers, head, the routed experts in
``mlp.switch_mlp``) follows the common shape.
"""

from mlx_lm.models.base import create_attention_mask

from .base import StageAdapter


class ArrayMaskAdapter(StageAdapter):
    def mask_for(self, hidden, cache, window):
        return create_attention_mask(hidden, cache, window_size=window, return_array=True)
