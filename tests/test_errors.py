"""Bad input gets one clear message and a non-zero exit — never a traceback, a hang, or a process
left behind. Each row: a cluster.yaml (or command) and a distinctive part of the message."""

from __future__ import annotations

import pytest
from cluster_helpers import free_ports, pomona, processes_using, running_cluster
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 6 layers; a short context so that "prompt too long" is cheap to reach.
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "llama", max_position_embeddings=64)


def _node(name: str, port: str) -> str:
    """A node entry for a template (braces doubled for str.format; the port is filled later)."""
    return "{{name: " + name + ", host: 127.0.0.1, port: {" + port + "}}}"


# (id, yaml template, expected message part). {model}, {p0}.. {p3} are filled in per test.
CASES = [
    ("invalid-yaml", "model: {model}\nnodes: [\n", "not valid YAML"),
    ("not-a-mapping", "- just\n- a list\n", "mapping"),
    (
        "misspelled-key",
        "model: {model}\nnodes:\n  - {{name: a, host: 127.0.0.1, prot: {p1}}}\n",
        "did you mean 'port'",
    ),
    ("unknown-top-key", "model: {model}\nnodez: []\n", "nodez"),
    ("missing-nodes", "model: {model}\n", "nodes"),
    ("port-type", "model: {model}\nnodes:\n  - {{name: a, host: 127.0.0.1, port: abc}}\n", "nodes[0].port"),
    ("model-missing", "model: /no/such/model\nnodes:\n  - " + _node("a", "p1"), "does not exist"),
    ("not-a-model", "model: {not_model}\nnodes:\n  - " + _node("a", "p1"), "not a model"),
    (
        "duplicate-name",
        "model: {model}\nnodes:\n  - " + _node("a", "p1") + "\n  - " + _node("a", "p2"),
        "duplicate node name 'a'",
    ),
    (
        "duplicate-address",
        "model: {model}\nnodes:\n  - " + _node("a", "p1") + "\n  - " + _node("b", "p1"),
        "nodes[1]",
    ),
    (
        "stage-overlap",
        "model: {model}\nnodes:\n  - "
        + _node("a", "p1")
        + "\n  - "
        + _node("b", "p2")
        + "\nplacement: {{stages: [{{node: a, layers: [0, 4]}}, {{node: b, layers: [3, 6]}}]}}\n",
        "overlaps",
    ),
    (
        "stage-gap",
        "model: {model}\nnodes:\n  - "
        + _node("a", "p1")
        + "\n  - "
        + _node("b", "p2")
        + "\nplacement: {{stages: [{{node: a, layers: [0, 2]}}, {{node: b, layers: [3, 6]}}]}}\n",
        "gap",
    ),
    (
        "stage-past-end",
        "model: {model}\nnodes:\n  - "
        + _node("a", "p1")
        + "\nplacement: {{stages: [{{node: a, layers: [0, 9]}}]}}\n",
        "has 6 layers",
    ),
    (
        "unknown-stage-node",
        "model: {model}\nnodes:\n  - "
        + _node("a", "p1")
        + "\nplacement: {{stages: [{{node: zz, layers: [0, 6]}}]}}\n",
        "zz",
    ),
    (
        "unreachable-node",
        "model: {model}\ncoordinator: {{host: 127.0.0.1, port: {p0}}}\nnodes:\n"
        "  - {{name: far, host: 127.0.0.1, port: {p3}, launch: manual}}\n",
        "did not answer within",
    ),
    (
        "does-not-fit",
        "model: {model}\ncoordinator: {{host: 127.0.0.1, port: {p0}}}\nnodes:\n"
        "  - {{name: a, host: 127.0.0.1, port: {p1}, memory_gb: 0.0001}}\n",
        "does not fit any subset of the nodes",
    ),
    (
        "unknown-objective",
        "model: {model}\nnodes:\n  - " + _node("a", "p1") + "\nplacement: {{objective: fastest}}\n",
        "unknown objective 'fastest'",
    ),
    (
        "negative-slack",
        "model: {model}\nnodes:\n  - " + _node("a", "p1") + "\nplacement: {{slack: -1}}\n",
        "placement.slack: must be a number of at least 0",
    ),
    (
        "unknown-machine",
        "model: {model}\nnodes:\n  - {{name: a, host: 127.0.0.1, port: {p1}, machine: mac_pro_2030}}\n",
        "unknown machine 'mac_pro_2030'",
    ),
    (
        "power-max-below-idle",
        "model: {model}\nnodes:\n"
        "  - {{name: a, host: 127.0.0.1, port: {p1}, power: {{idle_w: 50, max_w: 10}}}}\n",
        "nodes[0].power.max_w: must be at least idle_w",
    ),
]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("moe") / "deepseek")


def _moe_yaml(expert_entry: str, node_b: str = "") -> str:
    return (
        "model: {moe}\ncoordinator: {{host: 127.0.0.1, port: {p0}}}\nnodes:\n  - "
        + _node("a", "p1")
        + "\n  - {{name: b, host: 127.0.0.1, port: {p2}"
        + node_b
        + "}}\n"
        "placement:\n  stages: [{{node: a, layers: [0, 4]}}]\n  experts: [" + expert_entry + "]\n"
    )


# Expert placement mistakes: each caught before any weights load.
EXPERT_CASES = [
    (
        "expert-id-out-of-range",
        _moe_yaml("{{node: b, layers: [1, 4], experts: [0, 99]}}"),
        "expert ids 8-98 are outside",
    ),
    (
        "dense-layer-listed",
        _moe_yaml("{{node: b, layers: [0, 1], experts: [0, 2]}}"),
        "layer 0 is a dense layer",
    ),
    ("unknown-expert-node", _moe_yaml("{{node: zz, layers: [1, 4], experts: [0, 2]}}"), "unknown node 'zz'"),
    (
        "experts-do-not-fit",
        _moe_yaml("{{node: b, layers: [1, 4], experts: [0, 8]}}", ", memory_gb: 0.000001"),
        "does not fit",
    ),
    (
        "expert-node-unreachable",
        _moe_yaml("{{node: b, layers: [1, 4], experts: [0, 4]}}", ", launch: manual"),
        "did not answer within",
    ),
]


@pytest.mark.parametrize("name,template,expected", EXPERT_CASES, ids=[c[0] for c in EXPERT_CASES])
def test_bad_expert_placement(tmp_path, moe_dir, name, template, expected):
    p0, p1, p2 = free_ports(3)
    (tmp_path / "cluster.yaml").write_text(template.format(moe=moe_dir, p0=p0, p1=p1, p2=p2))
    result = pomona("up", "cluster.yaml", cwd=tmp_path, timeout_s=120)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert processes_using(str(tmp_path)) == []
    assert all(processes_using(f"--port {p}") == [] for p in (p1, p2))


@pytest.mark.parametrize("name,template,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_cluster_yaml(tmp_path, model_dir, name, template, expected):
    p0, p1, p2, p3 = free_ports(4)
    not_model = tmp_path / "empty"
    not_model.mkdir()
    text = template.format(model=model_dir, not_model=not_model, p0=p0, p1=p1, p2=p2, p3=p3)
    (tmp_path / "cluster.yaml").write_text(text)
    result = pomona("up", "cluster.yaml", cwd=tmp_path, timeout_s=120)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # A failed `up` leaves nothing behind.
    assert processes_using(str(tmp_path)) == []
    assert all(processes_using(f"--port {p}") == [] for p in (p1, p2, p3))


def test_missing_cluster_yaml(tmp_path):
    result = pomona("up", "nothere.yaml", cwd=tmp_path, timeout_s=60)
    assert result.returncode != 0 and "no such file" in result.stderr


def test_cluster_yaml_is_a_directory(tmp_path):
    (tmp_path / "cluster.yaml").mkdir()
    result = pomona("up", cwd=tmp_path, timeout_s=60)
    assert result.returncode != 0 and "cluster.yaml" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["generate", "hello"], ["status"]])
def test_no_cluster_running(tmp_path, command):
    result = pomona(*command, cwd=tmp_path, timeout_s=60)
    assert result.returncode != 0
    assert "no cluster is running here" in result.stderr


def test_bad_requests(tmp_path, model_dir):
    with running_cluster(tmp_path, model_dir, 1):
        long_prompt = "word " * 80
        result = pomona("generate", "--raw", long_prompt, cwd=tmp_path, timeout_s=120)
        assert result.returncode != 0 and "context holds 64" in result.stderr, result.stderr
        result = pomona("generate", "--temperature", "-1", "hi", cwd=tmp_path, timeout_s=120)
        assert result.returncode != 0 and "temperature must be >= 0" in result.stderr
        again = pomona("up", "cluster.yaml", cwd=tmp_path, timeout_s=60)
        assert again.returncode != 0 and "already running" in again.stderr
        ok = pomona("generate", "--raw", "--max-tokens", "3", "--json", "hi", cwd=tmp_path)
        assert ok.returncode == 0 and '"generated_tokens": 3' in ok.stdout


def test_family_that_cannot_be_split(tmp_path):
    """A state-space model (mamba): its layers are not called as (hidden, mask, cache), so no stage
    can run them alone; `up` says so in one line and leaves nothing behind."""
    model = make_tiny_checkpoint("mamba", tmp_path / "mamba")
    p0, p1 = free_ports(2)
    template = "model: {model}\ncoordinator: {{host: 127.0.0.1, port: {p0}}}\nnodes:\n  - " + _node("a", "p1")
    (tmp_path / "cluster.yaml").write_text(template.format(model=model, p0=p0, p1=p1))
    result = pomona("up", "cluster.yaml", cwd=tmp_path, timeout_s=120)
    assert result.returncode != 0
    assert "layer 0 (ResidualBlock) is called as (x, cache), not (hidden, mask, cache)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert processes_using(str(tmp_path)) == [] and processes_using(f"--port {p1}") == []
