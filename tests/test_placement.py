"""The pure layer planner: assign_layers, validate_stages, check_fit and plan_placement."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest

from pomona.config import (
    ClusterConfig,
    Endpoint,
    ExpertSpec,
    GenerationDefaults,
    NodeConfig,
    StageSpec,
)
from pomona.errors import PlacementError
from pomona.modelinfo import ModelInfo
from pomona.placement import (
    GIB,
    ExpertMap,
    LayerRange,
    Placement,
    StagePlacement,
    assign_layers,
    check_fit,
    expert_groups,
    format_ids,
    node_bytes,
    plan_experts,
    plan_placement,
    shard_bytes,
    validate_experts,
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


def config(*nodes: tuple[str, float | None], stages=None, experts=()) -> ClusterConfig:
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
        tuple(ExpertSpec(node, layers, tuple(ids)) for node, layers, ids in experts),
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


# --- experts ------------------------------------------------------------------------------------


def moe_model(num_layers: int = 4, experts: int = 8, dense: tuple[int, ...] = ()) -> ModelInfo:
    """Each layer: 1 GiB of attention/router plus `experts` routed experts of 1 GiB (MoE layers);
    embedding and head 1 GiB each. A whole model of 4 MoE layers and 8 experts: 38 GiB."""
    expert_bytes = tuple(0 if layer in dense else GIB for layer in range(num_layers))
    return ModelInfo(
        path=Path("/moe"),
        format="mlx",
        architecture="mixtral",
        num_layers=num_layers,
        context_length=4096,
        layer_bytes=tuple(GIB + experts * size for size in expert_bytes),
        embed_bytes=GIB,
        head_bytes=GIB,
        tied_embeddings=False,
        num_experts=experts,
        moe_layers=tuple(layer for layer in range(num_layers) if layer not in dense),
        expert_bytes=expert_bytes,
    )


VALIDATE_EXPERTS = [
    # (id, (node, layers, expert ids), model, message or None when valid)
    ("ok-range", ("b", (0, 4), range(8)), moe_model(), None),
    ("ok-mixed-range", ("b", (0, 4), [7]), moe_model(dense=(0, 2)), None),  # layers 1 and 3
    (
        "id-out-of-range",
        ("b", (0, 4), [6, 7, 8, 9]),
        moe_model(),
        "placement.experts[0] (node 'b', layers [0, 4)): expert ids 8-9 are outside the model's "
        "range: each MoE layer has 8 experts, ids 0 to 7",
    ),
    ("id-negative", ("b", (0, 4), [-1]), moe_model(), "expert ids -1 are outside"),
    (
        "dense-layer",
        ("b", (0, 1), [0]),
        moe_model(dense=(0,)),
        "layers [0, 1)): layer 0 is a dense layer, with no experts; the model's MoE layers are 1-3",
    ),
    (
        "dense-layers",
        ("b", (0, 2), [0]),
        moe_model(dense=(0, 1)),
        "layers 0 to 1 are all dense layers",
    ),
    (
        "layer-past-end",
        ("b", (2, 6), [0]),
        moe_model(),
        "layers [2, 6)) goes past the model's last layer: the model has 4 layers (0 to 3)",
    ),
    ("unknown-node", ("z", (0, 4), [0]), moe_model(), "names an unknown node; nodes are: 'a', 'b'"),
    ("dense-model", ("b", (0, 4), [0]), model(), "the model has no routed experts (it is dense)"),
    ("duplicate-ids", ("b", (0, 4), [3, 5, 3]), moe_model(), "lists expert 3 more than once"),
    ("empty-layer-range", ("b", (2, 2), [0]), moe_model(), "the layer range is empty"),
    ("no-ids", ("b", (0, 4), []), moe_model(), "lists no experts"),
]


@pytest.mark.parametrize(
    "spec, moe, message",
    [row[1:] for row in VALIDATE_EXPERTS],
    ids=[row[0] for row in VALIDATE_EXPERTS],
)
def test_validate_experts(spec: tuple, moe: ModelInfo, message: str | None) -> None:
    node, layers, ids = spec
    specs = [ExpertSpec(node, layers, tuple(ids))]
    if message is None:
        validate_experts(specs, moe, node_names=["a", "b"])
    else:
        with pytest.raises(PlacementError, match=re.escape(message)) as caught:
            validate_experts(specs, moe, node_names=["a", "b"])
        assert "placement.experts" in str(caught.value)


def layer_map(num_experts: int = 8, **holders: list[int]) -> dict[int, tuple[str, ...]]:
    """{expert: (node,)} from node=[ids] keywords."""
    result = {e: (node,) for node, ids in holders.items() for e in ids}
    assert sorted(result) == list(range(num_experts))
    return result


FOUR_NODES = (("a", None), ("b", None), ("c", None), ("d", None))
PLENTY = {name: 100 * GIB for name in "abcd"}


def test_explicit_experts_split_over_two_expert_only_nodes() -> None:
    cluster = config(*FOUR_NODES, stages=[("a", 0, 4)],
                     experts=[("b", (0, 4), range(0, 4)), ("c", (0, 4), range(4, 8))])  # fmt: skip
    placement = plan_placement(cluster, moe_model(), PLENTY)
    split = layer_map(b=[0, 1, 2, 3], c=[4, 5, 6, 7])
    assert placement.experts == ExpertMap({layer: split for layer in range(4)})
    assert placement.nodes == ("a", "b", "c")  # d holds nothing
    # a keeps attention and routers (4 x 1 GiB) plus embedding and head; b and c 16 experts each.
    assert node_bytes(moe_model(), placement) == {"a": 6 * GIB, "b": 16 * GIB, "c": 16 * GIB}
    assert placement.experts.experts_on("c", 2) == (4, 5, 6, 7)
    assert expert_groups(placement.experts)[:2] == [("b", 0, (0, 1, 2, 3)), ("c", 0, (4, 5, 6, 7))]


def test_replicas_unlisted_experts_and_stage_nodes_listed_explicitly() -> None:
    cluster = config(
        *FOUR_NODES,
        stages=[("a", 0, 2), ("b", 2, 4)],
        experts=[
            ("c", (1, 3), [0, 1]),  # layers 1 and 2: experts 0 and 1 leave their stage nodes
            ("d", (1, 2), [1, 7]),  # expert 1 of layer 1 on c and d: a replica
            ("a", (1, 2), [7]),  # the stage node listed with d: both hold expert 7 of layer 1
            ("d", (0, 4), [2]),  # layer 0 is dense here: the range means layers 1 to 3
        ],
    )
    moe = moe_model(dense=(0,))
    placement = plan_placement(cluster, moe, PLENTY)
    assert dict(placement.experts) == {
        1: {0: ("c",), 1: ("c", "d"), 2: ("d",), 3: ("a",), 4: ("a",), 5: ("a",), 6: ("a",),
            7: ("d", "a")},
        2: {0: ("c",), 1: ("c",), 2: ("d",), **{e: ("b",) for e in range(3, 8)}},
        3: {2: ("d",), **{e: ("b",) for e in (0, 1, 3, 4, 5, 6, 7)}},
    }  # fmt: skip
    assert placement.experts.holders(1, 7) == ("d", "a")
    assert placement.experts.holders(0, 0) == ()  # dense layer
    # a: layers 0-1 without routed experts (1 GiB each), the embedding, experts 3-7 of layer 1.
    # b: layers 2-3 (1 GiB each), the head, experts 3-7 of layer 2 and 6 of layer 3.
    held = node_bytes(moe, placement)
    assert held == {"a": (1 + 1 + 1 + 5) * GIB, "b": (2 + 1 + 5 + 7) * GIB,
                    "c": 4 * GIB, "d": (2 + 3) * GIB}  # fmt: skip
    # Two replicas (expert 1 and expert 7 of layer 1): each counts on both holders.
    assert sum(held.values()) == moe.total_bytes + 2 * GIB
    assert placement.stage_for_layer(3).node == "b"


def test_expert_groups_for_display() -> None:
    expert_map = ExpertMap({5: {0: ("b",), 1: ("b", "c"), 2: ("a",)}, 1: {0: ("c",), 1: ("c",)}})
    assert expert_groups(expert_map) == [
        ("c", 1, (0, 1)),
        ("b", 5, (0, 1)),
        ("c", 5, (1,)),
        ("a", 5, (2,)),
    ]
    assert format_ids([9, 0, 1, 2, 3, 7, 10]) == "0-3, 7, 9-10"
    assert expert_map.nodes == ("c", "b", "a")
    # Immutable and hashable, so the frozen Placement stays hashable.
    assert hash(Placement((), expert_map)) == hash(Placement((), ExpertMap(dict(expert_map))))
    with pytest.raises(TypeError):
        expert_map[5][0] = ("z",)  # type: ignore[index]


def test_dense_model_has_an_empty_expert_map() -> None:
    placement = plan_placement(config(("a", None), ("b", None)), model(), PLENTY)
    assert placement.experts == ExpertMap() and not placement.experts


SPREAD = [
    # (id, capacities of a (the only stage, 38 GiB with all experts), b, c in GiB; layer 3's map)
    ("fits-nothing-moves", (38, 1, 1), None),
    # 8 experts must go; c has the most room and takes the whole of layer 3.
    ("roomiest-node", (30, 10, 20), layer_map(c=range(8))),
    # b is roomiest; once b is full the rest go to c. Highest ids move first.
    ("two-destinations", (30, 5, 4), layer_map(a=[], b=[3, 4, 5, 6, 7], c=[0, 1, 2])),
    # Only 3 experts must go; the lowest ids stay home.
    ("partial-layer", (35, 10, 10), layer_map(a=range(5), b=[5, 6, 7])),
]


@pytest.mark.parametrize(
    "capacities_gib, layer_3", [row[1:] for row in SPREAD], ids=[row[0] for row in SPREAD]
)
def test_automatic_spreading_when_the_stage_node_is_too_small(
    capacities_gib: tuple[int, int, int], layer_3: dict | None
) -> None:
    nodes = [(name, float(gib)) for name, gib in zip("abc", capacities_gib, strict=True)]
    placement = plan_placement(config(*nodes, stages=[("a", 0, 4)]), moe_model(), {})
    on_a = layer_map(a=range(8))
    assert dict(placement.experts) == {0: on_a, 1: on_a, 2: on_a, 3: layer_3 or on_a}
    held = node_bytes(moe_model(), placement)
    memory = dict(zip("abc", capacities_gib, strict=True))
    assert all(size <= memory[node] * GIB for node, size in held.items())


def test_automatic_spreading_moves_the_last_layers_first_across_stages() -> None:
    # Two stages (a: layers 0-1 with the embedding, b: 2-3 with the head), 19 GiB each; a has 18
    # GiB, so one expert of layer 1 moves to the roomiest node: c, expert-only.
    cluster = config(("a", 18.0), ("b", 19.0), ("c", 4.0), stages=[("a", 0, 2), ("b", 2, 4)])
    placement = plan_placement(cluster, moe_model(), {})
    assert placement.experts[1] == layer_map(a=range(7), c=[7])
    assert placement.experts[2] == layer_map(b=range(8))


@pytest.mark.parametrize(
    "capacities_gib, message",
    [
        (
            (30, 3, 2),
            "the model does not fit: node 'a' needs 38.00 GiB for layers [0, 4) with all their "
            "experts but has 30.00 GiB; moving experts out would need 8.00 GiB free on other "
            "nodes, and they had room for 5.00 GiB of its experts "
            "(free: 'b' 3.00 GiB, 'c' 2.00 GiB)",
        ),
        ((30, 0.5, 0.5), "had room for 0.0 MiB of its experts (free: 'b' 512.0 MiB, 'c' 512.0"),
        ((5, 99, 99), "even with every expert of its layers on other nodes it needs 6.00 GiB"),
    ],
    ids=["not-enough-room", "no-expert-fits-anywhere", "non-expert-part-too-big"],
)
def test_automatic_spreading_that_cannot_fit(capacities_gib: tuple, message: str) -> None:
    nodes = [(name, float(gib)) for name, gib in zip("abc", capacities_gib, strict=True)]
    with pytest.raises(PlacementError, match=re.escape(message)) as caught:
        plan_placement(config(*nodes, stages=[("a", 0, 4)]), moe_model(), {})
    assert "placement.experts" in str(caught.value) and "memory_gb" in str(caught.value)


def test_explicit_experts_that_do_not_fit_name_the_node() -> None:
    # b holds a replica of every expert of layers 0-1 that a also keeps: 16 GiB on a 10 GiB node.
    cluster = config(("a", 100.0), ("b", 10.0), stages=[("a", 0, 4)],
                     experts=[("b", (0, 2), range(8)), ("a", (0, 2), range(8))])  # fmt: skip
    with pytest.raises(PlacementError) as caught:
        plan_placement(cluster, moe_model(), {})
    message = str(caught.value)
    assert "node 'b' needs 16.00 GiB for 16 experts of layers 0-1 but has 10.00 GiB" in message
    assert "move experts with placement.experts" in message and "node 'a'" not in message


def test_plan_experts_explicit_errors_name_the_entry() -> None:
    cluster = config(("a", None), ("b", None), stages=[("a", 0, 4)],
                     experts=[("b", (0, 4), [0]), ("zz", (0, 4), [1])])  # fmt: skip
    stages = (StagePlacement("a", LayerRange(0, 4), True, True),)
    with pytest.raises(PlacementError, match=re.escape("placement.experts[1] (node 'zz'")):
        plan_experts(cluster, moe_model(), stages, PLENTY)
    no_stage = config(("a", None), ("b", None), experts=[("b", (0, 2), [0])])
    partial = (StagePlacement("a", LayerRange(0, 2), True, True),)  # nobody runs layers 2-3
    with pytest.raises(PlacementError, match="experts 0-7 of layer 2 are held by no node"):
        plan_experts(no_stage, moe_model(), partial, PLENTY)
    with pytest.raises(PlacementError, match="the model has no routed experts"):
        plan_placement(config(("a", None), experts=[("a", (0, 4), [0])]), model(), PLENTY)


def test_check_fit_counts_experts_moved_off_a_stage() -> None:
    stages = (StagePlacement("a", LayerRange(0, 4), True, True),)
    everything_on_b = ExpertMap({layer: layer_map(b=range(8)) for layer in range(4)})
    check_fit(moe_model(), Placement(stages), {"a": 38 * GIB})  # no map: experts on the stage
    check_fit(moe_model(), Placement(stages, everything_on_b), {"a": 6 * GIB, "b": 32 * GIB})
    with pytest.raises(PlacementError, match="no memory figure for node 'b'"):
        check_fit(moe_model(), Placement(stages, everything_on_b), {"a": 6 * GIB})
