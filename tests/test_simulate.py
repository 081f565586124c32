"""The simulator: calibration against published results, compute profiles, SPEC.yaml parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from pomona.catalogue import catalogue, link_kind, machine
from pomona.errors import ConfigError
from pomona.profiles import COORDINATOR
from pomona.shapes import builtin_model
from pomona.simulate import (
    CALIBRATION,
    calibrate,
    catalogue_power,
    load_simulation_spec,
    predict_reference,
    simulated_compute,
)

# Fitted rows must come back within these fractions of the published tok/s; validation rows
# (kept out of the fit) are looser.
TG_TOLERANCE, PP_TOLERANCE, VALIDATION_TOLERANCE = 0.12, 0.12, 0.25


@pytest.mark.parametrize("reference", CALIBRATION, ids=lambda r: f"{r.machine}-{r.model}")
def test_calibration_reproduces_published_results(reference) -> None:
    tg, pp = predict_reference(reference)
    tolerance = TG_TOLERANCE if reference.fitted else VALIDATION_TOLERANCE
    assert tg == pytest.approx(reference.tg_tok_s, rel=tolerance)
    if reference.pp_tok_s:
        assert pp == pytest.approx(reference.pp_tok_s, rel=PP_TOLERANCE)


def test_fitted_efficiencies_are_physical() -> None:
    efficiency = calibrate()
    assert 0.8 < efficiency.bandwidth <= 1.0
    assert 0.5 < efficiency.flops < 0.8
    assert 0 < efficiency.layer_overhead_s < 0.001


def test_every_calibration_machine_is_in_the_catalogue() -> None:
    for reference in CALIBRATION:
        assert machine(reference.machine).name == reference.machine


def test_compute_profile_of_an_moe_model() -> None:
    shape = builtin_model("deepseek-v3")
    profile = simulated_compute(machine("mac_studio_2025_m3_ultra"), shape, 512, 1024, 16384)
    assert profile.num_layers == 61 and profile.experts_per_token == 8
    assert profile.source.startswith("simulated (catalogue: mac_studio_2025_m3_ultra")
    decode_tok_s = 1 / (sum(profile.decode_layer_s) + profile.embed_s + profile.head_s)
    assert 10 < decode_tok_s < 40  # published: ~20 tok/s (llama.cpp), 21 tok/s (exo, 8-bit)
    assert all(long > short for long, short in zip(profile.decode_layer_long_s, profile.decode_layer_s))
    assert profile.expert_s[:3] == (0.0, 0.0, 0.0) and profile.expert_s[3] > 0
    assert all(p > d for p, d in zip(profile.prefill_layer_s, profile.decode_layer_s))


def test_faster_machine_is_faster() -> None:
    shape = builtin_model("llama-3.3-70b")
    slow = simulated_compute(machine("mac_mini_2024_m4_pro"), shape)
    fast = simulated_compute(machine("mac_studio_2025_m3_ultra"), shape)
    assert sum(fast.decode_layer_s) < sum(slow.decode_layer_s)
    assert sum(fast.prefill_layer_s) < sum(slow.prefill_layer_s)


def test_catalogue_power_says_where_it_came_from() -> None:
    official = catalogue_power(machine("mac_mini_2024_m4"))
    assert (official.idle_w, official.busy_w) == (4, 65)
    assert official.basis.startswith("estimated (catalogue: mac_mini_2024_m4, Apple wall figures")
    assert "estimate:" in catalogue_power(machine("macbook_pro_m4_max_2024")).basis


def test_catalogue_entries_carry_sources() -> None:
    data = catalogue()
    for mac in data.machines.values():
        assert mac.sources and mac.default_memory_gb in mac.memory_gb
    for link in data.links.values():
        assert link.sources and link.kind in ("measured", "secondary", "estimate")
    assert link_kind("thunderbolt5").bandwidth_bytes_per_s > link_kind("10gbe").bandwidth_bytes_per_s


# --- SPEC.yaml ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_spec_builds_a_cluster(tmp_path: Path) -> None:
    spec = write(
        tmp_path,
        "nodes:\n"
        "  - machine: mac_studio_2025_m3_ultra\n    count: 2\n    memory_gb: 256\n"
        "  - machine: mac_mini_2024_m4_pro\n    name: mini\n"
        "link: thunderbolt5\n"
        "links:\n  - between: [m3ultra, mini]\n    kind: 10gbe\n",
    )
    cluster = load_simulation_spec(spec, "qwen3-235b-a22b")
    assert cluster.names == ("m3ultra-1", "m3ultra-2", "mini-1")
    node = cluster.node("m3ultra-1")
    assert node.memory_bytes == int(256 * 2**30 * 0.75)
    assert node.machine == "mac_studio_2025_m3_ultra"
    assert node.power.basis.startswith("estimated (catalogue: mac_studio_2025_m3_ultra")
    assert node.compute.num_layers == 94
    assert cluster.node("mini-1").memory_bytes == int(64 * 2**30 * 0.75)  # default memory
    tb5, ten = link_kind("thunderbolt5"), link_kind("10gbe")
    assert cluster.link("m3ultra-1", "m3ultra-2").bandwidth_bytes_per_s == tb5.bandwidth_bytes_per_s
    assert cluster.link("mini-1", "m3ultra-2").bandwidth_bytes_per_s == ten.bandwidth_bytes_per_s
    assert cluster.link(COORDINATOR, "mini-1").latency_s == tb5.latency_s


def test_without_link_each_pair_gets_its_fastest_common_kind(tmp_path: Path) -> None:
    spec = write(
        tmp_path, "nodes:\n  - machine: mac_mini_2024_m4_pro\n    count: 2\n  - machine: mac_mini_2024_m4\n"
    )
    cluster = load_simulation_spec(spec, "llama-3.3-70b")
    tb5, tb4 = link_kind("thunderbolt5"), link_kind("thunderbolt4")
    assert cluster.link("m4pro-1", "m4pro-2").bandwidth_bytes_per_s == tb5.bandwidth_bytes_per_s
    assert cluster.link("m4pro-2", "m4mini-1").bandwidth_bytes_per_s == tb4.bandwidth_bytes_per_s


def test_spec_may_name_the_model(tmp_path: Path) -> None:
    spec = write(
        tmp_path, "model: mixtral-8x22b\nnodes:\n  - machine: mac_studio_2023_m2_ultra\nlink: 10gbe\n"
    )
    assert load_simulation_spec(spec).node("m2ultra-1").compute.experts_per_token == 2


M4 = "nodes:\n  - machine: mac_mini_2024_m4\n"
ERRORS = [
    (
        "nodes:\n  - machine: mac_studio_m3_ultra\n",
        "line 2: nodes[0].machine: unknown machine 'mac_studio_m3_ultra'; "
        "did you mean 'mac_studio_2025_m3_ultra'",
    ),
    (M4 + "link: tb5\n", "line 3: link: unknown link kind 'tb5'; known link kinds: thunderbolt5"),
    (M4 + "    count: 0\n", "line 3: nodes[0].count: must be a whole number of at least 1"),
    (M4 + "    memory_gb: 48\n", "nodes[0].memory_gb: mac_mini_2024_m4 comes with 16, 24, 32 GB"),
    ("nodes: [\n", "not valid YAML"),
    ("nodes: []\n", "line 1: nodes: must be a non-empty list"),
    (M4 + "    cout: 2\n", "nodes[0].cout: unknown key; did you mean 'count'"),
    (
        M4 + "    count: 2\nlink: thunderbolt5\n",
        "m4mini-1 (mac_mini_2024_m4) and m4mini-2 (mac_mini_2024_m4) share no thunderbolt5",
    ),
    (
        M4 + "links:\n  - between: [m4mini, studio]\n    kind: 1gbe\n",
        "links[0].between: no node or group 'studio'",
    ),
    ("link: wifi\n", "missing required key 'nodes'"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_spec_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    spec = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_simulation_spec(spec, "llama-3.3-70b")
    assert str(error.value).startswith(str(spec))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_spec_unknown_model(tmp_path: Path) -> None:
    spec = write(tmp_path, "nodes:\n  - machine: mac_mini_2024_m4\nlink: 1gbe\n")
    with pytest.raises(
        ConfigError, match="--model: unknown built-in model 'gpt-5'; known models: deepseek-v3"
    ):
        load_simulation_spec(spec, "gpt-5")


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the simulation spec"):
        load_simulation_spec(tmp_path / "nope.yaml", "llama-3.3-70b")


def test_unknown_machine_and_link_names() -> None:
    with pytest.raises(ConfigError, match="known machines: mac_mini_2023_m2, "):
        machine("mac_pro_2023")
    with pytest.raises(ConfigError, match="known link kinds: thunderbolt5, thunderbolt4, 10gbe, 1gbe, wifi"):
        link_kind("infiniband")
