"""Per-family adapters: how a stage of an mlx-lm model embeds, masks, caches and finishes.

mlx-lm's model classes run the whole stack in one ``__call__``; a pipeline stage runs a slice of it.
Each adapter says what that slice needs from its family. One file per family, mlx-lm style.
"""

from pomona.errors import ModelError

from .base import FamilyAdapter
from .deepseek_v3 import DeepseekV3Adapter
from .llama import LlamaAdapter
from .llama4 import Llama4Adapter
from .mixtral import MixtralAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "llama": LlamaAdapter,
    "llama4": Llama4Adapter,
    "mixtral": MixtralAdapter,
    "qwen3_moe": Qwen3MoeAdapter,
    "deepseek_v3": DeepseekV3Adapter,
}


def adapter_for(architecture: str) -> FamilyAdapter:
    """The adapter for an mlx-lm ``model_type``; a clear error for families Pomona cannot shard."""
    try:
        return ADAPTERS[architecture]()
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise ModelError(
            f"model architecture {architecture!r} is not supported for pipeline serving "
            f"(supported: {supported})"
        ) from None
