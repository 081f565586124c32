"""DeepSeek-V3 and GLM-4-MoE-Lite (MLA attention): why the generic adapter is not enough.

mlx-lm's backbones of these families build their mask with ``create_attention_mask(...,
return_array=True)``: their MLA attention adds the mask to the scores itself, and the "causal"
shortcut the other families pass fails there ("Invalid type str received in array
initialization"). Everything else (embedding, layers, head, the routed experts) follows the
common shape.
"""

from mlx_lm.models.base import create_attention_mask

from .base import StageAdapter


class ArrayMaskAdapter(StageAdapter):
    def mask_for(self, hidden, cache, window):
        return create_attention_mask(hidden, cache, window_size=window, return_array=True)
