"""cluster.yaml validation: every broken file gets one specific message; defaults are filled in."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from pomona.config import (
    ClusterConfig,
    Endpoint,
    ExpertSpec,
    GenerationDefaults,
    SshConfig,
    StageSpec,
    load_cluster_config,
)
from pomona.errors import ConfigError

TWO_NODES = """\
nodes:
  - {name: a, host: 127.0.0.1, port: 50051}
  - {name: b, host: 127.0.0.1, port: 50052}
"""


def load(tmp_path: Path, text: str) -> ClusterConfig:
    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(text))
    return load_cluster_config(path)


BROKEN = [
    # (id, yaml, a distinctive part of the message)
    ("bad-indent", "nodes:\n  - name: a\n   host: x\n", "line 3: not valid YAML"),
    ("unclosed-list", "nodes: [a, b\n", "not valid YAML: expected ',' or ']'"),
    ("empty-file", "", "the file is empty"),
    ("control-character", "nodes: \x07\n", "not valid YAML: unacceptable character"),
    ("two-documents", TWO_NODES + "---\n" + TWO_NODES, "line 4: not valid YAML: expected a single"),
    ("top-level-list", "- a\n- b\n", "the top level must be a mapping"),
    ("top-level-scalar", "hello\n", "the top level must be a mapping"),
    ("misspelled-top-key", "modle: x\n" + TWO_NODES, "modle: unknown key; did you mean 'model'?"),
    ("unknown-top-key", "colour: red\n" + TWO_NODES, "colour: unknown key; valid keys here:"),
    (
        "misspelled-node-key",
        "nodes:\n  - name: a\n    host: h\n    prot: 1\n",
        "line 4: nodes[0].prot: unknown key; did you mean 'port'?",
    ),
    ("missing-nodes", "model: default\n", "missing required key 'nodes'"),
    ("missing-host", "nodes:\n  - {name: a, port: 1}\n", "nodes[0]: missing required key 'host'"),
    ("missing-name", "nodes:\n  - {host: h, port: 1}\n", "nodes[0]: missing required key 'name'"),
    ("port-string", "nodes:\n  - {name: a, host: h, port: '50051'}\n", "remove the quotes"),
    ("port-range", "nodes:\n  - {name: a, host: h, port: 70000}\n", "from 1 to 65535"),
    ("port-bool", "nodes:\n  - {name: a, host: h, port: yes}\n", "nodes[0].port: must be a whole"),
    (
        "memory-negative",
        "nodes:\n  - {name: a, host: h, port: 1, memory_gb: -2}\n",
        "nodes[0].memory_gb: must be a number of GiB greater than 0",
    ),
    ("memory-string", "nodes:\n  - {name: a, host: h, port: 1, memory_gb: lots}\n", "'lots'"),
    ("nodes-empty", "nodes: []\n", "nodes: the list is empty"),
    ("nodes-mapping", "nodes: {a: 1}\n", "nodes: must be a list of nodes"),
    ("node-not-mapping", "nodes: [a]\n", "nodes[0]: must be a mapping"),
    ("name-number", "nodes:\n  - {name: 7, host: h, port: 1}\n", "nodes[0].name: must be a non-"),
    (
        "duplicate-name",
        "nodes:\n  - {name: a, host: h, port: 1}\n  - {name: a, host: h, port: 2}\n",
        "nodes[1].name: duplicate node name 'a' (also nodes[0])",
    ),
    (
        "duplicate-address",
        "nodes:\n  - {name: a, host: h, port: 1}\n  - {name: b, host: h, port: 1}\n",
        "nodes[1].port: h:1 is already used by node 'a'",
    ),
    (
        "localhost-is-loopback",
        "nodes:\n  - {name: a, host: localhost, port: 1}\n"
        "  - {name: b, host: 127.0.0.1, port: 1}\n",
        "is already used by node 'a'",
    ),
    (
        "coordinator-address",
        "nodes:\n  - {name: a, host: 127.0.0.1, port: 50050}\n",
        "127.0.0.1:50050 is the coordinator's address",
    ),
    ("launch-unknown", "nodes:\n  - {name: a, host: h, port: 1, launch: remote}\n", "one of local"),
    (
        "ssh-misspelled",
        "nodes:\n  - {name: a, host: h, port: 1, ssh: {usr: me}}\n",
        "nodes[0].ssh.usr: unknown key; did you mean 'user'?",
    ),
    ("ssh-not-mapping", "nodes:\n  - {name: a, host: h, port: 1, ssh: me}\n", "nodes[0].ssh: must"),
    (
        "env-bool",
        "nodes:\n  - {name: a, host: h, port: 1, env: {DEBUG: true}}\n",
        "nodes[0].env.DEBUG: environment values must be strings",
    ),
    (
        "duplicate-key",
        "nodes: []\nnodes: []\n",
        "line 2: nodes: duplicate key (first given on line 1)",
    ),
    ("coordinator-port", "coordinator: {port: -1}\n" + TWO_NODES, "coordinator.port: must be"),
    ("generation-zero", "generation: {max_tokens: 0}\n" + TWO_NODES, "generation.max_tokens: must"),
    ("micro-batches-word", "generation: {micro_batches: many}\n" + TWO_NODES, "micro_batches: must"),
    ("max-batch-huge", "generation: {max_batch: 5000}\n" + TWO_NODES, "from 1 to 1024"),
    ("prompt-cache-negative", "generation: {prompt_cache_tokens: -1}\n" + TWO_NODES, "tokens: must be"),
    ("transport-unknown", "transport: mpi\n" + TWO_NODES, "use one of: grpc, mlx-ring"),
    ("transport-empty", "transport: ''\n" + TWO_NODES, "transport: must be a non-empty string"),
    (
        "generation-misspelled",
        "generation: {max_token: 5}\n" + TWO_NODES,
        "did you mean 'max_tokens'?",
    ),
    ("model-number", "model: 5\n" + TWO_NODES, "model: must be a non-empty string"),
    (
        "placement-empty",
        TWO_NODES + "placement: {stages: []}\n",
        "placement.stages: must be a non-",
    ),
    ("placement-key", TWO_NODES + "placement: {stage: []}\n", "did you mean 'stages'?"),
    (
        "stage-unknown-node",
        TWO_NODES + "placement:\n  stages:\n    - {node: a, layers: [0, 2]}\n"
        "    - {node: bb, layers: [2, 4]}\n",
        "placement.stages[1].node: unknown node 'bb'; did you mean 'b'?",
    ),
    (
        "stage-node-twice",
        TWO_NODES + "placement:\n  stages:\n    - {node: a, layers: [0, 2]}\n"
        "    - {node: a, layers: [2, 4]}\n",
        "node 'a' already runs stage 0",
    ),
    (
        "layers-one-number",
        TWO_NODES + "placement: {stages: [{node: a, layers: 3}]}\n",
        "placement.stages[0].layers: must be [START, END]",
    ),
    (
        "layers-three",
        TWO_NODES + "placement: {stages: [{node: a, layers: [0, 1, 2]}]}\n",
        "[0, 1, 2]",
    ),
    ("layers-floats", TWO_NODES + "placement: {stages: [{node: a, layers: [0, 1.5]}]}\n", "START"),
    ("layers-empty", TWO_NODES + "placement: {stages: [{node: a, layers: [3, 3]}]}\n", "[3, 3]"),
    ("layers-reversed", TWO_NODES + "placement: {stages: [{node: a, layers: [4, 1]}]}\n", "[4, 1]"),
    (
        "layers-negative",
        TWO_NODES + "placement: {stages: [{node: a, layers: [-1, 2]}]}\n",
        "[-1, 2]",
    ),
    ("stage-missing-layers", TWO_NODES + "placement: {stages: [{node: a}]}\n", "'layers'"),
    ("placement-nothing", TWO_NODES + "placement: {}\n", "placement: needs `stages:`, `experts:`"),
    *[
        (f"experts-{name}", TWO_NODES + "placement:\n  experts:\n    - " + entry + "\n", message)
        for name, entry, message in [
            # (id, one `placement.experts` entry, a distinctive part of the message)
            ("unknown-node", "{node: c, layers: [0, 2], experts: [0, 4]}",
             "line 6: placement.experts[0].node: unknown node 'c'; nodes are: a, b"),
            ("misspelled-node", "{node: aa, layers: [0, 2], experts: [0, 4]}", "did you mean 'a'?"),
            ("missing-experts", "{node: a, layers: [0, 2]}", "missing required key 'experts'"),
            ("unknown-key", "{node: a, layers: [0, 2], expert: [0, 4]}", "did you mean 'experts'?"),
            ("layers-reversed", "{node: a, layers: [4, 2], experts: [0, 4]}",
             "placement.experts[0].layers: must be [START, END]"),
            ("layers-one-number", "{node: a, layers: 3, experts: [0, 4]}", "half-open"),
            ("range-empty", "{node: a, layers: [0, 2], experts: [4, 4]}",
             "placement.experts[0].experts: must be [START, END] for the half-open range"),
            ("range-reversed", "{node: a, layers: [0, 2], experts: [5, 1]}", "{ids: [3, 7, 9]}"),
            ("range-negative", "{node: a, layers: [0, 2], experts: [-2, 4]}",
             "expert ids start at 0, not the list [-2, 4]"),
            ("range-floats", "{node: a, layers: [0, 2], experts: [0, 2.5]}",
             "got the list [0, 2.5]"),
            ("three-numbers", "{node: a, layers: [0, 2], experts: [1, 5, 9]}",
             "a list of more than two ids is written {ids: [...]}"),
            ("scalar", "{node: a, layers: [0, 2], experts: 3}", "must be [START, END]"),
            ("ids-empty", "{node: a, layers: [0, 2], experts: {ids: []}}",
             "placement.experts[0].experts.ids: must be a non-empty list"),
            ("ids-strings", "{node: a, layers: [0, 2], experts: {ids: [a]}}", "whole numbers"),
            ("ids-negative", "{node: a, layers: [0, 2], experts: {ids: [3, -1]}}",
             "experts.ids: expert ids start at 0; -1 is negative"),
            ("ids-duplicate", "{node: a, layers: [0, 2], experts: {ids: [3, 7, 3]}}",
             "experts.ids: expert 3 is listed twice"),
            ("ids-misspelled", "{node: a, layers: [0, 2], experts: {id: [3]}}",
             "did you mean 'ids'?"),
        ]
    ],  # fmt: skip
    ("experts-empty", TWO_NODES + "placement: {experts: []}\n", "placement.experts: must be"),
    ("recovery-not-bool", TWO_NODES + "recovery: yes please\n", "recovery: must be true or false"),
    ("spare-not-bool", "nodes:\n  - {name: a, host: 127.0.0.1, port: 50051, spare: 1}\n",
     "nodes[0].spare: must be true or false"),
    ("every-node-spare", "nodes:\n  - {name: a, host: 127.0.0.1, port: 50051, spare: true}\n",
     "every node is `spare: true`"),
]


@pytest.mark.parametrize("text, expected", [row[1:] for row in BROKEN], ids=[r[0] for r in BROKEN])
def test_broken_config_is_rejected_with_a_specific_message(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert expected in message
    assert str(tmp_path / "cluster.yaml") in message  # every message names the file


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_cluster_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_cluster_config(tmp_path)  # a directory
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00nodes")
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_cluster_config(binary)


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "nodes:\n  - {name: a, host: 127.0.0.1, port: 50051}\n")
    assert config.path == (tmp_path / "cluster.yaml").resolve()
    assert config.model == "default"
    assert config.coordinator == Endpoint("127.0.0.1", 50050)
    assert config.stages is None
    assert config.experts == ()
    assert config.generation == GenerationDefaults(max_tokens=256, prefill_chunk_tokens=256)
    (node,) = config.nodes
    assert node.address == "127.0.0.1:50051"
    assert (node.launch, node.ssh, node.python, node.workdir, node.env) == (
        "local",
        None,
        sys.executable,
        None,
        {},
    )
    assert node.memory_gb is None


@pytest.mark.parametrize(
    "host, launch",
    [
        ("127.0.0.1", "local"),
        ("127.0.0.2", "local"),
        ("localhost", "local"),
        ("::1", "local"),
        ("10.0.0.2", "ssh"),
        ("mac-studio.local", "ssh"),
    ],
)
def test_launch_mode_is_inferred_from_host(tmp_path: Path, host: str, launch: str) -> None:
    config = load(tmp_path, f"nodes:\n  - {{name: a, host: '{host}', port: 50051}}\n")
    assert config.nodes[0].launch == launch


def test_ssh_node_defaults_and_overrides(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        nodes:
          - {name: a, host: 10.0.0.2, port: 50051}
          - name: b
            host: 10.0.0.3
            port: 50051
            memory_gb: 12.5
            ssh: {user: me, port: 2222, key_file: ~/.ssh/id_x, known_hosts: null}
            python: /opt/venv/bin/python
            workdir: /srv/pomona
            env: {OMP_NUM_THREADS: 1, MODE: fast}
          - {name: c, host: 10.0.0.4, port: 50051, launch: manual}
          - {name: d, host: 127.0.0.1, port: 50051, launch: ssh}
        """,
    )
    a, b, c, d = config.nodes
    assert a.ssh == SshConfig(None, 22, None, str(Path("~/.ssh/known_hosts").expanduser()))
    assert a.python == "python3"
    assert b.ssh == SshConfig("me", 2222, str(Path("~/.ssh/id_x").expanduser()), None)
    assert (b.memory_gb, b.python, b.workdir) == (12.5, "/opt/venv/bin/python", "/srv/pomona")
    assert b.env == {"OMP_NUM_THREADS": "1", "MODE": "fast"}
    assert (c.launch, c.ssh, c.python) == ("manual", None, None)
    assert (d.launch, d.ssh, d.python) == ("ssh", SshConfig(), "python3")


def test_model_paths_resolve_against_the_yaml_directory(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    load_path = tmp_path / "conf" / "cluster.yaml"
    load_path.write_text("model: ../models/m.gguf\n" + TWO_NODES)
    config = load_cluster_config(load_path)
    assert config.model == str((tmp_path / "models" / "m.gguf").resolve())
    load_path.write_text(f"model: {tmp_path}/abs\n" + TWO_NODES)
    assert load_cluster_config(load_path).model == str((tmp_path / "abs").resolve())


def test_full_config_with_placement_and_generation(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        TWO_NODES
        + """\
coordinator: {host: 0.0.0.0, port: 6000}
placement:
  stages:
    - {node: b, layers: [0, 12]}
    - {node: a, layers: [12, 30]}
generation: {max_tokens: 64, prefill_chunk_tokens: 32, max_batch: 8, micro_batches: 3}
""",
    )
    assert config.coordinator.address == "0.0.0.0:6000"
    assert config.stages == (StageSpec("b", 0, 12), StageSpec("a", 12, 30))
    assert config.generation == GenerationDefaults(64, 32, max_batch=8, micro_batches=3)
    auto = load(tmp_path, TWO_NODES + "generation: {micro_batches: auto}\n")
    assert auto.generation.micro_batches is None
    assert auto.generation.prompt_cache_tokens == 8192  # the default: on
    off = load(tmp_path, TWO_NODES + "generation: {prompt_cache_tokens: 0}\n")
    assert off.generation.prompt_cache_tokens == 0
    assert config.node("b").port == 50052
    assert config.transport == "grpc"
    assert load(tmp_path, TWO_NODES + "transport: mlx-ring\n").transport == "mlx-ring"


def test_expert_groups_ranges_and_ids(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        TWO_NODES
        + """\
  - {name: c, host: 127.0.0.1, port: 50053}
placement:
  stages:
    - {node: a, layers: [0, 8]}
  experts:
    - {node: b, layers: [0, 8], experts: [0, 8]}      # half-open: experts 0 to 7
    - {node: c, layers: [2, 4], experts: {ids: [9, 3, 7]}}
    - {node: c, layers: [0, 1], experts: [3, 4]}      # two numbers are a range: expert 3 alone
""",
    )
    assert config.stages == (StageSpec("a", 0, 8),)
    assert config.experts == (
        ExpertSpec("b", (0, 8), tuple(range(8))),
        ExpertSpec("c", (2, 4), (3, 7, 9)),  # sorted
        ExpertSpec("c", (0, 1), (3,)),
    )


def test_experts_without_stages_keep_automatic_stages(tmp_path: Path) -> None:
    entry = "{node: b, layers: [1, 3], experts: [0, 2]}"
    config = load(tmp_path, TWO_NODES + f"placement:\n  experts: [{entry}]\n")
    assert config.stages is None
    assert config.experts == (ExpertSpec("b", (1, 3), (0, 1)),)
