"""The pure layer planner: assign_layers, validate_stages, check_fit and plan_placement."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest

from pomona.config import ClusterConfig, Endpoint, GenerationDefaults, NodeConfig, StageSpec
from pomona.errors import PlacementError
from pomona.modelinfo import ModelInfo
from pomona.placement import (
    GIB,
    LayerRange,
    Placement,
    StagePlacement,
    assign_layers,
    check_fit,
    plan_placement,
    shard_bytes,
    validate_stages,
)


def ranges(*bounds: tuple[int, int]) -> list[LayerRange]:
    return [LayerRange(start, end) for start, end in bounds]


ASSIGN = [
    # (id, layer_bytes, embed_bytes, head_bytes, capacities, expected ranges)
    ("one-node", [5] * 4, 3, 3, [100], ranges((0, 4))),
    ("equal", [10] * 6, 0, 0, [1, 1, 1], ranges((0, 2), (2, 4), (4, 6))),
    # The embedding and head weigh 2.5 layers each: the middle stage takes the extra layers.
    ("big-embed-head", [10] * 9, 25, 25, [1, 1, 1], ranges((0, 2), (2, 7), (7, 9))),
    # A huge embedding pins stage 0 to one layer; the rest still split evenly (3 and 3).
    ("huge-embed", [1] * 7, 100, 0, [1, 1, 1], ranges((0, 1), (1, 4), (4, 7))),
    ("unequal-1-3", [10] * 8, 0, 0, [1, 3], ranges((0, 2), (2, 8))),
    ("unequal-2-1-1", [1] * 8, 0, 0, [2, 1, 1], ranges((0, 4), (4, 6), (6, 8))),
    ("big-last", [1] * 8, 0, 0, [1, 1, 6], ranges((0, 1), (1, 2), (2, 8))),
    ("uneven-layers", [1, 1, 1, 1, 8], 0, 0, [1, 1], ranges((0, 4), (4, 5))),
    ("one-layer-each", [7, 7, 7], 50, 50, [1, 1, 1], ranges((0, 1), (1, 2), (2, 3))),
    ("byte-scale", [2**28] * 30, 2**30, 2**30, [8 * GIB, 8 * GIB], ranges((0, 15), (15, 30))),
]


@pytest.mark.parametrize(
    "layer_bytes, embed_bytes, head_bytes, capacities, expected",
    [row[1:] for row in ASSIGN],
    ids=[row[0] for row in ASSIGN],
)
def test_assign_layers(
    layer_bytes: list[int],
    embed_bytes: int,
    head_bytes: int,
    capacities: list[int],
    expected: list[LayerRange],
) -> None:
    assert assign_layers(layer_bytes, embed_bytes, head_bytes, capacities) == expected


@pytest.mark.parametrize(
    "layer_bytes, capacities, message",
    [
        ([1, 1], [1, 1, 1], "3 nodes but the model has only 2 layers"),
        ([1, 1], [], "no nodes"),
        ([1, 1], [1, 0], "every node needs memory"),
    ],
    ids=["more-nodes-than-layers", "no-nodes", "zero-capacity"],
)
def test_assign_layers_errors(layer_bytes: list[int], capacities: list[int], message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        assign_layers(layer_bytes, 0, 0, capacities)


def _loads(layer_bytes, embed, head, splits, count):
    bounds = [0, *splits, len(layer_bytes)]
    return [
        sum(layer_bytes[bounds[k] : bounds[k + 1]])
        + (embed if k == 0 else 0)
        + (head if k == count - 1 else 0)
        for k in range(count)
    ]


def test_assign_layers_minimizes_the_worst_ratio_like_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(40):
        num_layers, num_stages = rng.randint(1, 9), rng.randint(1, 4)
        if num_stages > num_layers:
            continue
        layer_bytes = [rng.randint(1, 20) for _ in range(num_layers)]
        embed, head = rng.randint(0, 30), rng.randint(0, 30)
        capacities = [rng.randint(1, 5) for _ in range(num_stages)]
        best = min(
            max(
                load / cap
                for load, cap in zip(
                    _loads(layer_bytes, embed, head, splits, num_stages), capacities, strict=True
                )
            )
            for splits in itertools.combinations(range(1, num_layers), num_stages - 1)
        )
        got = assign_layers(layer_bytes, embed, head, capacities)
        assert got[0].start == 0 and got[-1].end == num_layers
        assert all(len(r) > 0 for r in got)
        assert all(a.end == b.start for a, b in itertools.pairwise(got))
        splits = [r.start for r in got[1:]]
        loads = _loads(layer_bytes, embed, head, splits, num_stages)
        worst = max(load / cap for load, cap in zip(loads, capacities, strict=True))
        assert worst == pytest.approx(best)


VALIDATE = [
    # (id, stages as (node, start, end), num_layers, message or None when valid)
    ("ok", [("a", 0, 12), ("b", 12, 30)], 30, None),
    ("ok-single", [("a", 0, 30)], 30, None),
    ("overlap", [("a", 0, 12), ("b", 10, 30)], 30, "overlaps stage 0 (node 'a'"),
    ("overlap-layers", [("a", 0, 12), ("b", 10, 30)], 30, "layers 10 to 11 would run twice"),
    ("gap", [("a", 0, 12), ("b", 14, 30)], 30, "layers 12 to 13 run nowhere"),
    ("past-end", [("a", 0, 12), ("b", 12, 40)], 30, "stage 1 (node 'b', layers [12, 40))"),
    ("past-end-count", [("a", 0, 31)], 30, "the model has 30 layers"),
    ("not-from-zero", [("a", 2, 30)], 30, "must start at layer 0"),
    ("short", [("a", 0, 12), ("b", 12, 20)], 30, "layers 20 to 29 run nowhere"),
    ("empty-stage", [("a", 0, 0)], 30, "is empty"),
    ("no-stages", [], 30, "no stages"),
]


@pytest.mark.parametrize(
    "stages, num_layers, message", [row[1:] for row in VALIDATE], ids=[r[0] for r in VALIDATE]
)
def test_validate_stages(
    stages: list[tuple[str, int, int]], num_layers: int, message: str | None
) -> None:
    specs = [StageSpec(*stage) for stage in stages]
    if message is None:
        assert validate_stages(specs, num_layers) == [LayerRange(s, e) for _, s, e in stages]
    else:
        with pytest.raises(PlacementError, match=re.escape(message)):
            validate_stages(specs, num_layers)


def model(num_layers: int = 4, layer: int = GIB, embed: int = GIB, head: int = GIB, tied=False):
    return ModelInfo(
        path=Path("/m"),
        format="mlx",
        architecture="llama",
        num_layers=num_layers,
        context_length=4096,
        layer_bytes=(layer,) * num_layers,
        embed_bytes=embed,
        head_bytes=head,
        tied_embeddings=tied,
    )


def pipeline(*stages: tuple[str, int, int]) -> Placement:
    last = len(stages) - 1
    return Placement(
        tuple(
            StagePlacement(node, LayerRange(s, e), i == 0, i == last)
            for i, (node, s, e) in enumerate(stages)
        )
    )


def test_shard_bytes_counts_embedding_head_and_tied_sharing() -> None:
    m = model(layer=10, embed=100, head=1000)
    assert shard_bytes(m, LayerRange(0, 2), True, False) == 120
    assert shard_bytes(m, LayerRange(2, 4), False, True) == 1020
    assert shard_bytes(m, LayerRange(1, 3), False, False) == 20
    tied = model(layer=10, embed=100, head=101, tied=True)  # head = norm (1) + embedding again
    assert shard_bytes(tied, LayerRange(0, 4), True, True) == 40 + 100 + 1


def test_check_fit_passes_and_names_the_node_that_is_too_small() -> None:
    m = model()  # 4 GiB of layers + 1 embed + 1 head
    placement = pipeline(("mac-a", 0, 2), ("mac-b", 2, 4))
    check_fit(m, placement, {"mac-a": 3 * GIB, "mac-b": 3 * GIB})
    with pytest.raises(PlacementError) as caught:
        check_fit(m, placement, {"mac-a": 3 * GIB, "mac-b": 2 * GIB})
    message = str(caught.value)
    assert "node 'mac-b' needs 3.00 GiB" in message and "has 2.00 GiB" in message
    assert "mac-a" not in message
    assert "memory_gb" in message and "quantized" in message


def config(*nodes: tuple[str, float | None], stages=None) -> ClusterConfig:
    node_configs = tuple(
        NodeConfig(name, "127.0.0.1", 50051 + i, memory, "local", None, "python", None, {})
        for i, (name, memory) in enumerate(nodes)
    )
    return ClusterConfig(
        Path("/c.yaml"),
        "default",
        Endpoint("127.0.0.1", 50050),
        node_configs,
        None if stages is None else tuple(StageSpec(*s) for s in stages),
        GenerationDefaults(),
    )


def test_plan_placement_automatic_uses_file_order_and_measured_memory() -> None:
    placement = plan_placement(
        config(("a", None), ("b", None)), model(), {"a": 10 * GIB, "b": 10 * GIB}
    )
    assert placement == pipeline(("a", 0, 2), ("b", 2, 4))
    assert placement.stage_of("b").is_last and placement.num_layers == 4


def test_plan_placement_memory_gb_overrides_measurement() -> None:
    cluster = config(("a", 1.0), ("b", None))  # 1 GiB: not even the embedding plus one layer
    with pytest.raises(PlacementError, match="node 'a' needs"):
        plan_placement(cluster, model(), {"a": 100 * GIB, "b": 100 * GIB})
    cluster = config(("a", 3.0), ("b", None))  # b, 100 GiB, takes all but one layer
    placement = plan_placement(cluster, model(), {"b": 100 * GIB})
    assert placement == pipeline(("a", 0, 1), ("b", 1, 4))


def test_plan_placement_explicit_stages() -> None:
    cluster = config(("a", None), ("b", None), stages=[("b", 0, 1), ("a", 1, 4)])
    placement = plan_placement(cluster, model(), {"a": 10 * GIB, "b": 10 * GIB})
    assert placement == pipeline(("b", 0, 1), ("a", 1, 4))
    bad = config(("a", None), ("b", None), stages=[("b", 0, 1), ("a", 1, 5)])
    with pytest.raises(PlacementError, match="the model has 4 layers"):
        plan_placement(bad, model(), {"a": 10 * GIB, "b": 10 * GIB})


def test_plan_placement_without_memory_figure() -> None:
    with pytest.raises(PlacementError, match="node 'b' reported no memory figure"):
        plan_placement(config(("a", None), ("b", None)), model(), {"a": GIB})
