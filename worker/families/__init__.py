"""Stage adapters: how a pipeline stage of an mlx-lm model embeds, masks, caches and finishes.

``StageAdapter`` (base.py) derives all of it from the model object for every family of mlx-lm's
common shape. A family gets a file here only where it really differs, and the file says why.
"""

from __future__ import annotations

import mlx.nn as nn

from .base import StageAdapter
from .deepseek_v3 import ArrayMaskAdapter
from .llama4 import Llama4Adapter

# Real exceptions only; every other family uses StageAdapter.
EXCEPTIONS: dict[str, type[StageAdapter]] = {
    "llama4": Llama4Adapter,
    # mlx-lm's backbones of these families build explicit array masks for their MLA attention.
    "deepseek_v3": ArrayMaskAdapter,
    "glm4_moe_lite": ArrayMaskAdapter,
}


def adapter_for(model: nn.Module, architecture: str) -> StageAdapter:
    """The adapter bound to ``model`` (whole, before a stage drops anything), an mlx-lm
    ``model_type`` ``architecture``; a ModelError naming what is missing when it cannot split."""
    return EXCEPTIONS.get(architecture, StageAdapter)(model, architecture)
