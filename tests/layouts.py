"""Stage layouts used by the tests: boundaries on the layers where each family is interesting."""

# family -> {stage count: half-open layer ranges}
LAYOUTS: dict[str, dict[int, list[tuple[int, int]]]] = {
    # 6 dense layers.
    "llama": {2: [(0, 2), (2, 6)], 3: [(0, 1), (1, 4), (4, 6)]},
    # 8 layers: MoE on odd layers; NoPE global attention on layers 3 and 7, chunked elsewhere.
    "llama4": {2: [(0, 3), (3, 8)], 3: [(0, 1), (1, 4), (4, 8)]},
    # 4 layers, all MoE.
    "mixtral": {2: [(0, 1), (1, 4)], 3: [(0, 1), (1, 3), (3, 4)]},
    "qwen3_moe": {2: [(0, 1), (1, 4)], 3: [(0, 2), (2, 3), (3, 4)]},
    # 4 layers: layer 0 dense, 1-3 MoE with shared experts.
    "deepseek_v3": {2: [(0, 1), (1, 4)], 3: [(0, 2), (2, 3), (3, 4)]},
}

# Longer than llama4's attention chunk (8 tokens), so chunked and global masks differ.
PROMPT = "The quick brown fox jumps over the lazy dog, and the layers are split across nodes."
