import sys
from pathlib import Path

import pytest

# Test helpers (tiny_models, cluster_helpers, layouts) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, make_tiny_checkpoint  # noqa: E402  (found through the path above)


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory):
    """Read-only tiny checkpoints of every family, plus a 4-bit mixtral and a bfloat16 llama."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {family: make_tiny_checkpoint(family, root / family) for family in FAMILIES}
    made["mixtral-q4"] = make_tiny_checkpoint("mixtral", root / "mixtral-q4", quantize_bits=4)
    made["llama-bf16"] = make_tiny_checkpoint("llama", root / "llama-bf16", dtype="bfloat16")
    return made
