"""cluster.yaml: reading it into frozen dataclasses, and rejecting it with one clear message.

`load_cluster_config` owns the whole file format. Every problem raises `ConfigError` whose message
names the file, the line (when YAML knows it), the field path (`nodes[1].port`) and what to do, so
the CLI can print it as-is. Whether the model exists is checked later by `pomona.modelinfo`, and
whether the stages cover the model's layers by `pomona.placement` (both need the model).

Units: `memory_gb` is GiB (2**30 bytes), the unit placement error messages use.

Ranges are half-open, like Python's `range`: `layers: [0, 12]` is layers 0 to 11. In
`placement.experts`, `experts:` is either a two-number list, the half-open range `[START, END]`
(`[0, 8]` is experts 0 to 7), or a mapping `{ids: [3, 7, 9]}` listing expert ids one by one; so
`[3, 7]` means experts 3 to 6, and two single experts are written `{ids: [3, 7]}`. Whether the
ids and layers exist in the model is checked by `pomona.placement.validate_experts`.
"""

from __future__ import annotations

import difflib
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pomona.api_config import ApiSettings, check_api_port, parse_api
from pomona.errors import ConfigError
from pomona.yaml_reader import LineList, LineMap, Reader, compose, is_int, kind

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
    known_hosts: str | None = field(default_factory=lambda: str(Path(DEFAULT_KNOWN_HOSTS).expanduser()))


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
    power: PowerSpec | None = None  # idle and busy watts for the estimate (no meter)
    machine: str | None = None  # a catalogue name (pomona.catalogue): power and links estimate
    spare: bool = False  # started and measured, but serves only when a serving node is lost
    tls: TlsFiles | None = None  # this node's own certificate and key (the CA is the cluster's)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files on the coordinator's machine (absolute paths); `ca` is None for a node's own
    `tls: {cert, key}`, which uses the cluster's CA."""

    ca: str | None
    cert: str
    key: str


@dataclass(frozen=True)
class AuthSettings:
    token_file: str | None = None  # None: `pomona up` generates a token


@dataclass(frozen=True)
class PowerSpec:
    """A node's power draw for the estimate, from cluster.yaml `power: {idle_w, max_w}`."""

    idle_w: float
    max_w: float


@dataclass(frozen=True)
class SchedulerSettings:
    """How automatic placement chooses (`placement.objective`, `.slack`, `.workload`)."""

    objective: str = "balanced"
    slack: float = 0.1  # balanced: latency may be up to (1 + slack) x the best
    prompt_tokens: int = 512
    generated_tokens: int = 256
    concurrency: int = 1


OBJECTIVES = ("latency", "throughput", "energy", "balanced")


@dataclass(frozen=True)
class StageSpec:
    """An explicit stage from cluster.yaml: `node` holds layers [start, end)."""

    node: str
    start: int
    end: int


@dataclass(frozen=True)
class ExpertSpec:
    """An expert group from cluster.yaml: `node` holds these routed experts of the MoE layers in
    [layers[0], layers[1]). `experts` are ids, sorted, each once."""

    node: str
    layers: tuple[int, int]
    experts: tuple[int, ...]


@dataclass(frozen=True)
class GenerationDefaults:
    max_tokens: int = 256
    prefill_chunk_tokens: int = 256
    max_context: int | None = None  # tokens of KV cache each stream may hold; None: the model's
    max_batch: int = 32  # requests decoded together in one micro-batch (continuous batching)
    # Decode micro-batches in flight around the ring; None ("auto"): one per machine the stages
    # run on (stages sharing a machine share its cores, so overlapping them gains little).
    micro_batches: int | None = None
    # The prompt cache: tokens of finished requests' caches kept (at every stage, for its layers)
    # so that a prompt starting with the same tokens skips their prefill; 0 turns it off.
    prompt_cache_tokens: int = 8192


@dataclass(frozen=True)
class ClusterConfig:
    path: Path  # absolute path of the yaml file
    model: str  # "default", or an absolute path to a .gguf file or checkpoint directory
    coordinator: Endpoint
    nodes: tuple[NodeConfig, ...]
    stages: tuple[StageSpec, ...] | None  # None: placement is automatic
    generation: GenerationDefaults
    experts: tuple[ExpertSpec, ...] = ()  # empty: every expert stays on its layer's stage node
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    recovery: bool = True  # re-plan and replay in-flight requests when a serving node is lost
    api: ApiSettings = field(default_factory=ApiSettings)  # the HTTP API (pomona.api_config)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsFiles | None = None  # mutual TLS between all nodes; cert/key: the coordinator's
    # Stage-to-stage messages: "grpc" (Forward streams) or "mlx-ring" (an mx.distributed ring).
    transport: str = "grpc"

    def node(self, name: str) -> NodeConfig:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (where `launch` defaults to local)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the schema -------------------------------------------------------------------------------

_TOP_KEYS = (
    "model", "coordinator", "nodes", "placement", "generation", "api", "recovery", "auth", "tls",
    "transport",
)
TRANSPORTS = ("grpc", "mlx-ring")
_NODE_KEYS = (
    "name",
    "host",
    "port",
    "memory_gb",
    "launch",
    "ssh",
    "python",
    "workdir",
    "env",
    "power",
    "machine",
    "spare",
    "tls",
)
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
    reader = Reader(shown)
    root, line = compose(reader, text)
    if not isinstance(root, LineMap):
        problem = f"the top level must be a mapping (`model:`, `nodes:`, ...), not {kind(root)}"
        reader.fail("", line, problem)
    return _parse_root(reader, root, file.resolve())


def _parse_root(reader: Reader, root: LineMap, file: Path) -> ClusterConfig:
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
    if not isinstance(nodes_value, LineList):
        problem = f"must be a list of nodes (`- name: ...` entries), not {kind(nodes_value)}"
        reader.bad(root, "nodes", "", problem)
    if not nodes_value:
        reader.bad(root, "nodes", "", "the list is empty; add at least one node")
    nodes = tuple(
        _parse_node(reader, item, f"nodes[{index}]", nodes_value.item_lines[index], file.parent)
        for index, item in enumerate(nodes_value)
    )
    _check_unique(reader, nodes, nodes_value, coordinator)
    if all(node.spare for node in nodes):
        reader.bad(root, "nodes", "", "every node is `spare: true`; at least one must serve")

    stages, experts, scheduler = None, (), SchedulerSettings()
    if root.get("placement") is not None:
        stages, experts, scheduler = _parse_placement(reader, root, nodes)

    generation = GenerationDefaults()
    if root.get("generation") is not None:
        block = reader.block(root, "generation", "")
        keys = ("max_tokens", "prefill_chunk_tokens", "max_context", "max_batch", "micro_batches",
                "prompt_cache_tokens")
        reader.keys(block, "generation", keys)
        micro_batches = None
        if block.get("micro_batches", "auto") != "auto":
            micro_batches = reader.integer(block, "micro_batches", "generation", None, 1, 64)
        generation = GenerationDefaults(
            max_tokens=reader.integer(block, "max_tokens", "generation", generation.max_tokens, 1),
            prefill_chunk_tokens=reader.integer(
                block, "prefill_chunk_tokens", "generation", generation.prefill_chunk_tokens, 1
            ),
            max_context=reader.integer(block, "max_context", "generation", None, 1),
            max_batch=reader.integer(block, "max_batch", "generation", generation.max_batch, 1, 1024),
            micro_batches=micro_batches,
            prompt_cache_tokens=reader.integer(
                block, "prompt_cache_tokens", "generation", generation.prompt_cache_tokens, 0, 2**31 - 1
            ),
        )
    recovery = root.get("recovery", True)
    if not isinstance(recovery, bool):
        reader.bad(root, "recovery", "", f"must be true or false, not {kind(recovery)}")
    transport = reader.string(root, "transport", "", "grpc")
    if transport not in TRANSPORTS:
        hint = f"use one of: {', '.join(TRANSPORTS)}"
        reader.bad(root, "transport", "", f"unknown transport {transport!r}; {hint}")
    api = parse_api(reader, root)
    taken = {_address_key(coordinator.host, coordinator.port): "the coordinator"}
    taken.update({_address_key(n.host, n.port): f"node {n.name!r}" for n in nodes})
    check_api_port(reader, root, api, taken)
    auth = AuthSettings()
    if root.get("auth") is not None:
        block = reader.block(root, "auth", "")
        reader.keys(block, "auth", ("token_file",), required=("token_file",))
        auth = AuthSettings(_file(reader, block, "token_file", "auth", file.parent))
    tls = _parse_tls(reader, root, "", ("ca", "cert", "key"), file.parent)
    for index, node in enumerate(nodes):
        if node.tls is not None and tls is None:
            reader.fail(f"nodes[{index}].tls", nodes_value[index].line,
                        "a node's own certificate needs the top-level `tls: {ca, cert, key}`")
    return ClusterConfig(
        file, model, coordinator, nodes, stages, generation, experts, scheduler,
        recovery=recovery, api=api, auth=auth, tls=tls, transport=transport,
    )


def _file(reader: Reader, block: LineMap, key: str, path: str, base: Path) -> str:
    """An existing file, relative to the yaml's directory."""
    value = reader.string(block, key, path)
    resolved = (base / Path(str(value)).expanduser()).resolve()
    if not resolved.is_file():
        reader.bad(block, key, path, f"no such file {str(resolved)!r}; `pomona certs` makes TLS files")
    return str(resolved)


def _parse_tls(reader: Reader, parent: LineMap, path: str, keys: tuple, base: Path) -> TlsFiles | None:
    if parent.get("tls") is None:
        return None
    block = reader.block(parent, "tls", path)
    tls_path = f"{path}.tls" if path else "tls"
    reader.keys(block, tls_path, keys, required=keys)
    files = {key: _file(reader, block, key, tls_path, base) for key in keys}
    return TlsFiles(files.get("ca"), files["cert"], files["key"])


def _parse_node(reader: Reader, value: Any, path: str, line: int, base: Path) -> NodeConfig:
    block = reader.mapping(value, path, line)
    reader.keys(block, path, _NODE_KEYS, required=("name", "host", "port"))
    name = reader.string(block, "name", path)
    host = reader.string(block, "host", path)
    port = reader.port(block, "port", path)

    memory_gb = block.get("memory_gb")
    if memory_gb is not None and (
        not isinstance(memory_gb, int | float) or isinstance(memory_gb, bool) or memory_gb <= 0
    ):
        problem = f"must be a number of GiB greater than 0, not {kind(memory_gb)}"
        reader.bad(block, "memory_gb", path, problem + "; omit it to use the measured memory")

    launch = reader.string(block, "launch", path, "local" if is_loopback(host) else "ssh")
    if launch not in LAUNCH_MODES:
        reader.bad(block, "launch", path, f"must be one of {', '.join(LAUNCH_MODES)}, not {launch!r}")

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
            if not isinstance(key, str) or isinstance(item, bool) or not isinstance(item, str | int | float):
                problem = f"environment values must be strings, not {kind(item)}; quote it"
                reader.bad(env_block, key, f"{path}.env", problem)
            env[key] = str(item)
    power = None
    if block.get("power") is not None:
        power_block = reader.block(block, "power", path)
        power_path = f"{path}.power"
        reader.keys(power_block, power_path, ("idle_w", "max_w"), required=("idle_w", "max_w"))
        idle_w = _number(reader, power_block, "idle_w", power_path)
        max_w = _number(reader, power_block, "max_w", power_path)
        if max_w < idle_w:
            reader.bad(power_block, "max_w", power_path, f"must be at least idle_w ({idle_w} W)")
        power = PowerSpec(idle_w, max_w)
    machine = reader.string(block, "machine", path)
    spare = block.get("spare", False)
    if not isinstance(spare, bool):
        reader.bad(block, "spare", path, f"must be true or false, not {kind(spare)}")
    tls = _parse_tls(reader, block, path, ("cert", "key"), base)
    return NodeConfig(
        name, host, port, memory_gb, launch, ssh, python, workdir, env, power, machine,
        spare=spare, tls=tls,
    )


def _number(reader: Reader, block: LineMap, key: str, path: str, low: float = 0.0) -> float:
    value = block[key]
    if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
        reader.bad(block, key, path, f"must be a number of at least {low}, not {kind(value)}")
    return float(value)


def _parse_ssh(reader: Reader, node_block: LineMap, node_path: str) -> SshConfig:
    path = f"{node_path}.ssh"
    block = reader.block(node_block, "ssh", node_path)
    reader.keys(block, path, _SSH_KEYS)
    key_file = reader.string(block, "key_file", path)
    known_hosts = DEFAULT_KNOWN_HOSTS
    if "known_hosts" in block:
        # An explicit null is the documented way to switch host key checking off.
        known_hosts = None if block["known_hosts"] is None else reader.string(block, "known_hosts", path)
    return SshConfig(
        user=reader.string(block, "user", path),
        port=reader.port(block, "port", path, 22),
        key_file=str(Path(key_file).expanduser()) if key_file else None,
        known_hosts=str(Path(known_hosts).expanduser()) if known_hosts else None,
    )


def _address_key(host: str, port: int) -> tuple[str, int]:
    host = host.lower()
    return ("127.0.0.1" if host == "localhost" else host, port)


def _check_unique(
    reader: Reader, nodes: tuple[NodeConfig, ...], items: LineList, coordinator: Endpoint
) -> None:
    key = _address_key
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


_EXPERTS_FORMS = (
    "[START, END] for the half-open range of expert ids START to END - 1 (so [0, 8] is experts "
    "0 to 7), or {ids: [3, 7, 9]} to list ids one by one"
)


def _parse_placement(
    reader: Reader, root: LineMap, nodes: tuple[NodeConfig, ...]
) -> tuple[tuple[StageSpec, ...] | None, tuple[ExpertSpec, ...]]:
    block = reader.block(root, "placement", "")
    reader.keys(block, "placement", ("stages", "experts", "objective", "slack", "workload"))
    if not block:
        problem = (
            "needs `stages:`, `experts:`, `objective:` or `workload:`; omit `placement:` to "
            "place automatically"
        )
        reader.fail("placement", block.line, problem)
    names = [node.name for node in nodes]
    stages = _parse_stages(reader, block, names) if "stages" in block else None
    experts = _parse_experts(reader, block, names) if "experts" in block else ()
    return stages, experts, _parse_scheduler(reader, block)


def _parse_scheduler(reader: Reader, block: LineMap) -> SchedulerSettings:
    settings = SchedulerSettings()
    objective = reader.string(block, "objective", "placement", settings.objective)
    if objective not in OBJECTIVES:
        close = difflib.get_close_matches(str(objective), OBJECTIVES, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else "use one of " + ", ".join(OBJECTIVES)
        reader.bad(block, "objective", "placement", f"unknown objective {objective!r}; {hint}")
    slack = _number(reader, block, "slack", "placement") if "slack" in block else settings.slack
    workload = {}
    if block.get("workload") is not None:
        work = reader.block(block, "workload", "placement")
        keys = ("prompt_tokens", "generated_tokens", "concurrency")
        reader.keys(work, "placement.workload", keys)
        workload = {
            key: reader.integer(work, key, "placement.workload", getattr(settings, key), 1) for key in keys
        }
    return SchedulerSettings(objective, slack, **workload)


def _check_node(reader: Reader, entry: LineMap, path: str, names: list[str]) -> str:
    node = reader.string(entry, "node", path)
    if node not in names:
        close = difflib.get_close_matches(node, names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "nodes are: " + ", ".join(names)
        reader.bad(entry, "node", path, f"unknown node {node!r}; {hint}")
    return node


def _half_open(value: Any) -> tuple[int, int] | None:
    """(start, end) when value is a [START, END] list with 0 <= START < END, else None."""
    valid = isinstance(value, LineList) and len(value) == 2 and all(map(is_int, value))
    return (value[0], value[1]) if valid and 0 <= value[0] < value[1] else None


def _check_layers(reader: Reader, entry: LineMap, path: str) -> tuple[int, int]:
    layers = _half_open(entry["layers"])
    if layers is None:
        problem = (
            "must be [START, END] with whole numbers 0 <= START < END (half-open: [0, 12] "
            f"holds layers 0 to 11), not {kind(entry['layers'])}"
        )
        reader.bad(entry, "layers", path, problem)
    return layers


def _parse_stages(reader: Reader, block: LineMap, names: list[str]) -> tuple[StageSpec, ...]:
    stages_value = block["stages"]
    if not isinstance(stages_value, LineList) or not stages_value:
        problem = "must be a non-empty list of `{node: NAME, layers: [START, END]}`"
        reader.bad(block, "stages", "placement", problem + "; omit `placement:` to place automatically")
    used: dict[str, int] = {}
    stages = []
    for index, item in enumerate(stages_value):
        path = f"placement.stages[{index}]"
        stage = reader.mapping(item, path, stages_value.item_lines[index])
        reader.keys(stage, path, ("node", "layers"), required=("node", "layers"))
        node = _check_node(reader, stage, path, names)
        if node in used:
            problem = f"node {node!r} already runs stage {used[node]}; a node runs one stage"
            reader.bad(stage, "node", path, problem)
        used[node] = index
        start, end = _check_layers(reader, stage, path)
        stages.append(StageSpec(node, start, end))
    return tuple(stages)


def _parse_experts(reader: Reader, block: LineMap, names: list[str]) -> tuple[ExpertSpec, ...]:
    experts_value = block["experts"]
    if not isinstance(experts_value, LineList) or not experts_value:
        problem = (
            "must be a non-empty list of `{node: NAME, layers: [START, END], experts: ...}`; "
            "omit it to keep every expert on its layer's stage node"
        )
        reader.bad(block, "experts", "placement", problem)
    specs = []
    for index, item in enumerate(experts_value):
        path = f"placement.experts[{index}]"
        entry = reader.mapping(item, path, experts_value.item_lines[index])
        keys = ("node", "layers", "experts")
        reader.keys(entry, path, keys, required=keys)
        node = _check_node(reader, entry, path, names)
        layers = _check_layers(reader, entry, path)
        specs.append(ExpertSpec(node, layers, _expert_ids(reader, entry, path)))
    return tuple(specs)


def _expert_ids(reader: Reader, entry: LineMap, path: str) -> tuple[int, ...]:
    value = entry["experts"]
    if isinstance(value, LineMap):
        path = f"{path}.experts"
        reader.keys(value, path, ("ids",), required=("ids",))
        ids = value["ids"]
        if not isinstance(ids, LineList) or not ids or not all(map(is_int, ids)):
            problem = f"must be a non-empty list of whole numbers, not {kind(ids)}"
            reader.bad(value, "ids", path, problem)
        negative = [i for i in ids if i < 0]
        if negative:
            problem = f"expert ids start at 0; {negative[0]} is negative"
            reader.bad(value, "ids", path, problem)
        seen: set[int] = set()
        for expert in ids:
            if expert in seen:
                reader.bad(value, "ids", path, f"expert {expert} is listed twice; list it once")
            seen.add(expert)
        return tuple(sorted(ids))
    is_pair = isinstance(value, LineList) and len(value) == 2 and all(map(is_int, value))
    if is_pair and min(value) < 0:
        reader.bad(entry, "experts", path, f"expert ids start at 0, not {kind(value)}")
    span = _half_open(value)
    if span is None:
        hint = (
            "; a list of more than two ids is written {ids: [...]}"
            if isinstance(value, LineList) and len(value) > 2
            else ""
        )
        problem = f"must be {_EXPERTS_FORMS}; got {kind(value)}{hint}"
        reader.bad(entry, "experts", path, problem)
    return tuple(range(*span))
