"""cluster.yaml: reading it into frozen dataclasses, and rejecting it with one clear message.

`load_cluster_config` owns the whole file format. Every problem raises `ConfigError` whose message
names the file, the line (when YAML knows it), the field path (`nodes[1].port`) and what to do, so
the CLI can print it as-is. Whether the model exists is checked later by `pomona.modelinfo`, and
whether the stages cover the model's layers by `pomona.placement` (both need the model).

Units: `memory_gb` is GiB (2**30 bytes), the unit placement error messages use.
"""

from __future__ import annotations

import difflib
import ipaddress
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from pomona.errors import ConfigError

DEFAULT_MODEL = "default"
DEFAULT_COORDINATOR = ("127.0.0.1", 50050)
LAUNCH_MODES = ("local", "ssh", "manual")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SshConfig:
    """How to reach a node over SSH. Paths are on the coordinator's machine, `~` expanded."""

    user: str | None = None  # None: SSH's own default (current user, ~/.ssh/config)
    port: int = 22
    key_file: str | None = None  # None: SSH's default keys and agent
    # None: host keys are NOT checked (the yaml said `known_hosts: null`).
    known_hosts: str | None = field(
        default_factory=lambda: str(Path(DEFAULT_KNOWN_HOSTS).expanduser())
    )


@dataclass(frozen=True)
class NodeConfig:
    name: str
    host: str
    port: int
    memory_gb: float | None  # overrides the measured available memory (GiB) when set
    launch: str  # one of LAUNCH_MODES
    ssh: SshConfig | None  # always set when launch == "ssh"
    python: str | None  # interpreter on the node; None for launch == "manual"
    workdir: str | None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StageSpec:
    """An explicit stage from cluster.yaml: `node` holds layers [start, end)."""

    node: str
    start: int
    end: int


@dataclass(frozen=True)
class GenerationDefaults:
    max_tokens: int = 256
    prefill_chunk_tokens: int = 256


@dataclass(frozen=True)
class ClusterConfig:
    path: Path  # absolute path of the yaml file
    model: str  # "default", or an absolute path to a .gguf file or checkpoint directory
    coordinator: Endpoint
    nodes: tuple[NodeConfig, ...]
    stages: tuple[StageSpec, ...] | None  # None: placement is automatic
    generation: GenerationDefaults

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


# --- YAML with line numbers -------------------------------------------------------------------
# PyYAML's plain loader forgets where things were; we compose the node tree ourselves so every
# value keeps its line, and so duplicate keys (which PyYAML silently collapses) can be reported.


class _Map(dict):
    line: int
    key_lines: dict[Any, int]


class _Seq(list):
    item_lines: list[int]


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Reader:
    """Validation helpers that all raise ConfigError mentioning the file, line and field path."""

    def __init__(self, shown_path: str) -> None:
        self.shown_path = shown_path

    def fail(self, path: str, line: int | None, problem: str) -> NoReturn:
        where = self.shown_path if line is None else f"{self.shown_path}, line {line}"
        raise ConfigError(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")

    def bad(self, parent: _Map, key: Any, path: str, problem: str) -> NoReturn:
        """Fail at `parent[key]`, a value of the mapping at `path`."""
        self.fail(_join(path, key), parent.key_lines[key], problem)

    def convert(self, loader: yaml.SafeLoader, node: yaml.Node, path: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # resolves `<<: *anchor` merges
            result = _Map()
            result.line, result.key_lines = _line(node), {}
            for key_node, value_node in node.value:
                key = self.convert(loader, key_node, path)
                if not isinstance(key, str | int | float | bool):
                    self.fail(path, _line(key_node), "keys must be plain names")
                child = _join(path, key)
                if key in result:
                    first = result.key_lines[key]
                    self.fail(
                        child, _line(key_node), f"duplicate key (first given on line {first})"
                    )
                result[key] = self.convert(loader, value_node, child)
                result.key_lines[key] = _line(key_node)
            return result
        if isinstance(node, yaml.SequenceNode):
            items = _Seq()
            items.item_lines = []
            for index, item in enumerate(node.value):
                items.append(self.convert(loader, item, f"{path}[{index}]"))
                items.item_lines.append(_line(item))
            return items
        try:
            return loader.construct_object(node)
        except yaml.YAMLError as error:
            self.fail(path, _line(node), f"cannot read this value: {error}")

    def keys(
        self, value: _Map, path: str, allowed: Collection[str], required: Collection[str] = ()
    ) -> None:
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
                hint = (
                    f"did you mean '{close[0]}'?"
                    if close
                    else "valid keys here: " + ", ".join(allowed)
                )
                self.fail(_join(path, key), value.key_lines[key], f"unknown key; {hint}")
        for key in required:
            if key not in value:
                self.fail(path, value.line, f"missing required key '{key}'")

    def mapping(self, value: Any, path: str, line: int | None) -> _Map:
        if not isinstance(value, _Map):
            self.fail(path, line, f"must be a mapping of `key: value` lines, not {_kind(value)}")
        return value

    def block(self, parent: _Map, key: str, path: str) -> _Map:
        return self.mapping(parent[key], _join(path, key), parent.key_lines[key])

    def string(self, parent: _Map, key: str, path: str, default: Any = None) -> Any:
        if key not in parent:
            return default
        value = parent[key]
        if not isinstance(value, str) or not value.strip():
            self.bad(parent, key, path, f"must be a non-empty string, not {_kind(value)}")
        return value

    def integer(
        self, parent: _Map, key: str, path: str, default: Any, low: int, high: int | None = None
    ) -> Any:
        if key not in parent:
            return default
        value = parent[key]
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        if not _is_int(value) or value < low or (high is not None and value > high):
            is_quoted_number = isinstance(value, str) and value.strip().isdigit()
            hint = "; remove the quotes" if is_quoted_number else ""
            self.bad(parent, key, path, f"must be a whole number {span}, not {_kind(value)}{hint}")
        return value

    def port(self, parent: _Map, key: str, path: str, default: Any = None) -> Any:
        return self.integer(parent, key, path, default, 1, 65535)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `yes` is a bool


def _kind(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, _Map):
        return "a mapping"
    if isinstance(value, _Seq):
        return f"the list {list(value)!r}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    return repr(value)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (where `launch` defaults to local)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the schema -------------------------------------------------------------------------------

_TOP_KEYS = ("model", "coordinator", "nodes", "placement", "generation")
_NODE_KEYS = ("name", "host", "port", "memory_gb", "launch", "ssh", "python", "workdir", "env")
_SSH_KEYS = ("user", "port", "key_file", "known_hosts")


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster.yaml; raise ConfigError with one actionable message."""
    shown = str(path)
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(
            f"{shown}: no such file; pass the path of your cluster.yaml "
            "(the repository's cluster.yaml is a working example)"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{shown}: cannot read the file ({error}); check it is a readable text file"
        ) from None
    reader = _Reader(shown)
    root, line = _compose(reader, text)
    if not isinstance(root, _Map):
        problem = f"the top level must be a mapping (`model:`, `nodes:`, ...), not {_kind(root)}"
        reader.fail("", line, problem)
    return _parse_root(reader, root, file.resolve())


def _compose(reader: _Reader, text: str) -> tuple[Any, int]:
    """The document as _Map/_Seq/scalars, and the line where it starts."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # rejects control characters already
        root_node = loader.get_single_node()
        if root_node is None:
            reader.fail("", None, "the file is empty; it needs at least a `nodes:` list")
        return reader.convert(loader, root_node, ""), _line(root_node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or "syntax error"
        if error.context:  # "expected a single document..." reads first; "while parsing..." after
            expected = error.context.startswith("expected")
            started = (
                f" started on line {error.context_mark.line + 1}" if error.context_mark else ""
            )
            context = f"{error.context}{started}"
            problem = f"{error.context} {problem}" if expected else f"{problem} ({context})"
        hint = "; check indentation and quoting around this line"
        reader.fail("", mark.line + 1 if mark else None, f"not valid YAML: {problem}{hint}")
    except yaml.YAMLError as error:
        reader.fail("", None, f"not valid YAML: {error}")
    finally:
        if loader is not None:
            loader.dispose()


def _parse_root(reader: _Reader, root: _Map, file: Path) -> ClusterConfig:
    reader.keys(root, "", _TOP_KEYS, required=("nodes",))
    model = reader.string(root, "model", "", DEFAULT_MODEL)
    if model != DEFAULT_MODEL:
        # Relative paths mean "next to the yaml", so a cluster file works from any directory.
        model = str((file.parent / Path(model).expanduser()).resolve())

    coordinator = Endpoint(*DEFAULT_COORDINATOR)
    if root.get("coordinator") is not None:
        block = reader.block(root, "coordinator", "")
        reader.keys(block, "coordinator", ("host", "port"))
        coordinator = Endpoint(
            reader.string(block, "host", "coordinator", coordinator.host),
            reader.port(block, "port", "coordinator", coordinator.port),
        )

    nodes_value = root["nodes"]
    if not isinstance(nodes_value, _Seq):
        problem = f"must be a list of nodes (`- name: ...` entries), not {_kind(nodes_value)}"
        reader.bad(root, "nodes", "", problem)
    if not nodes_value:
        reader.bad(root, "nodes", "", "the list is empty; add at least one node")
    nodes = tuple(
        _parse_node(reader, item, f"nodes[{index}]", nodes_value.item_lines[index])
        for index, item in enumerate(nodes_value)
    )
    _check_unique(reader, nodes, nodes_value, coordinator)

    stages = None
    if root.get("placement") is not None:
        stages = _parse_placement(reader, root, nodes)

    generation = GenerationDefaults()
    if root.get("generation") is not None:
        block = reader.block(root, "generation", "")
        reader.keys(block, "generation", ("max_tokens", "prefill_chunk_tokens"))
        generation = GenerationDefaults(
            max_tokens=reader.integer(block, "max_tokens", "generation", generation.max_tokens, 1),
            prefill_chunk_tokens=reader.integer(
                block, "prefill_chunk_tokens", "generation", generation.prefill_chunk_tokens, 1
            ),
        )
    return ClusterConfig(file, model, coordinator, nodes, stages, generation)


def _parse_node(reader: _Reader, value: Any, path: str, line: int) -> NodeConfig:
    block = reader.mapping(value, path, line)
    reader.keys(block, path, _NODE_KEYS, required=("name", "host", "port"))
    name = reader.string(block, "name", path)
    host = reader.string(block, "host", path)
    port = reader.port(block, "port", path)

    memory_gb = block.get("memory_gb")
    if memory_gb is not None and (
        not isinstance(memory_gb, int | float) or isinstance(memory_gb, bool) or memory_gb <= 0
    ):
        problem = f"must be a number of GiB greater than 0, not {_kind(memory_gb)}"
        reader.bad(block, "memory_gb", path, problem + "; omit it to use the measured memory")

    launch = reader.string(block, "launch", path, "local" if is_loopback(host) else "ssh")
    if launch not in LAUNCH_MODES:
        reader.bad(
            block, "launch", path, f"must be one of {', '.join(LAUNCH_MODES)}, not {launch!r}"
        )

    ssh = _parse_ssh(reader, block, path) if block.get("ssh") is not None else None
    if ssh is None and launch == "ssh":
        ssh = SshConfig()

    default_python = {"local": sys.executable, "ssh": "python3", "manual": None}[launch]
    python = reader.string(block, "python", path, default_python)
    workdir = reader.string(block, "workdir", path)

    env: dict[str, str] = {}
    if block.get("env") is not None:
        env_block = reader.block(block, "env", path)
        for key, item in env_block.items():
            # Numbers are fine (OMP_NUM_THREADS: 1); bools and nulls are almost always a mistake.
            if (
                not isinstance(key, str)
                or isinstance(item, bool)
                or not isinstance(item, str | int | float)
            ):
                problem = f"environment values must be strings, not {_kind(item)}; quote it"
                reader.bad(env_block, key, f"{path}.env", problem)
            env[key] = str(item)
    return NodeConfig(name, host, port, memory_gb, launch, ssh, python, workdir, env)


def _parse_ssh(reader: _Reader, node_block: _Map, node_path: str) -> SshConfig:
    path = f"{node_path}.ssh"
    block = reader.block(node_block, "ssh", node_path)
    reader.keys(block, path, _SSH_KEYS)
    key_file = reader.string(block, "key_file", path)
    known_hosts = DEFAULT_KNOWN_HOSTS
    if "known_hosts" in block:
        # An explicit null is the documented way to switch host key checking off.
        known_hosts = (
            None if block["known_hosts"] is None else reader.string(block, "known_hosts", path)
        )
    return SshConfig(
        user=reader.string(block, "user", path),
        port=reader.port(block, "port", path, 22),
        key_file=str(Path(key_file).expanduser()) if key_file else None,
        known_hosts=str(Path(known_hosts).expanduser()) if known_hosts else None,
    )


def _check_unique(
    reader: _Reader, nodes: tuple[NodeConfig, ...], items: _Seq, coordinator: Endpoint
) -> None:
    def key(host: str, port: int) -> tuple[str, int]:
        host = host.lower()
        return ("127.0.0.1" if host == "localhost" else host, port)

    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    coordinator_key = key(coordinator.host, coordinator.port)
    for index, node in enumerate(nodes):
        block = items[index]
        if node.name in names:
            problem = f"duplicate node name {node.name!r} (also nodes[{names[node.name]}])"
            reader.bad(block, "name", f"nodes[{index}]", problem + "; names must be unique")
        names[node.name] = index
        address = key(node.host, node.port)
        if address == coordinator_key:
            problem = f"{node.address} is the coordinator's address; pick another port"
            reader.bad(block, "port", f"nodes[{index}]", problem)
        if address in addresses:
            other = nodes[addresses[address]].name
            problem = f"{node.address} is already used by node {other!r}; use another port"
            reader.bad(block, "port", f"nodes[{index}]", problem)
        addresses[address] = index


def _parse_placement(
    reader: _Reader, root: _Map, nodes: tuple[NodeConfig, ...]
) -> tuple[StageSpec, ...]:
    block = reader.block(root, "placement", "")
    reader.keys(block, "placement", ("stages",), required=("stages",))
    stages_value = block["stages"]
    if not isinstance(stages_value, _Seq) or not stages_value:
        problem = "must be a non-empty list of `{node: NAME, layers: [START, END]}`"
        reader.bad(
            block, "stages", "placement", problem + "; omit `placement:` to place automatically"
        )
    names = [node.name for node in nodes]
    used: dict[str, int] = {}
    stages = []
    for index, item in enumerate(stages_value):
        path = f"placement.stages[{index}]"
        stage = reader.mapping(item, path, stages_value.item_lines[index])
        reader.keys(stage, path, ("node", "layers"), required=("node", "layers"))
        node = reader.string(stage, "node", path)
        if node not in names:
            close = difflib.get_close_matches(node, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "nodes are: " + ", ".join(names)
            reader.bad(stage, "node", path, f"unknown node {node!r}; {hint}")
        if node in used:
            problem = f"node {node!r} already runs stage {used[node]}; a node runs one stage"
            reader.bad(stage, "node", path, problem)
        used[node] = index
        layers = stage["layers"]
        valid = isinstance(layers, _Seq) and len(layers) == 2 and all(map(_is_int, layers))
        if not valid or not 0 <= layers[0] < layers[1]:
            problem = (
                "must be [START, END] with whole numbers 0 <= START < END (half-open: [0, 12] "
                f"holds layers 0 to 11), not {_kind(layers)}"
            )
            reader.bad(stage, "layers", path, problem)
        stages.append(StageSpec(node, layers[0], layers[1]))
    return tuple(stages)
