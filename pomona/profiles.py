"""What the scheduler knows about a cluster: measured (or simulated) profiles of nodes and links.

These are plain frozen dataclasses, shared by the worker-side profilers that fill them, the
coordinator that gathers them, the simulator that invents them for hypothetical clusters, and the
pure cost model and planner that read them. No I/O, no MLX.

Units are in the names: seconds (`_s`), bytes, watts (`_w`), bytes per second.

Every power figure carries a `basis` that says where it came from, written for people:
`measured (zeus-apple-silicon)`, `estimated (catalogue: mac_mini_2024_m4, Apple wall figures)`,
`estimated (cluster.yaml power)`, ... A figure that is not measured is never shown without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pomona.expert_load import ExpertLoad


@dataclass(frozen=True)
class ComputeProfile:
    """Seconds one node takes for this model's pieces (measured there, or simulated).

    Per-layer tuples have one entry per transformer layer of the model. A MoE layer's entries
    include its routing and its top-k routed experts computed locally; `expert_s[i]` is ONE routed
    expert's MLP on one token, so the cost model can move experts elsewhere.
    """

    decode_layer_s: tuple[float, ...]  # one token, at context `short_context` tokens
    decode_layer_long_s: tuple[float, ...]  # one token, at context `long_context` tokens
    short_context: int
    long_context: int
    prefill_layer_s: tuple[float, ...]  # one prefill chunk of `prefill_chunk_tokens` tokens
    prefill_chunk_tokens: int
    embed_s: float  # token embedding, one token
    head_s: float  # final norm + output projection (+ sampling), one position
    expert_s: tuple[float, ...] = ()  # per layer: one routed expert, one token; 0 for dense; () = dense
    experts_per_token: int = 0  # top-k of the model's router (0 for dense)
    source: str = "measured"  # "measured" or "simulated (<basis>)"

    def __post_init__(self) -> None:
        n = len(self.decode_layer_s)
        if len(self.decode_layer_long_s) != n or len(self.prefill_layer_s) != n:
            raise ValueError("decode_layer_s, decode_layer_long_s and prefill_layer_s differ in length")
        if not self.expert_s:
            object.__setattr__(self, "expert_s", (0.0,) * n)
        if len(self.expert_s) != n:
            raise ValueError("expert_s needs one entry per layer")
        if not 0 < self.short_context <= self.long_context:
            raise ValueError("need 0 < short_context <= long_context")

    @property
    def num_layers(self) -> int:
        return len(self.decode_layer_s)

    def decode_at(self, layer: int, context: float) -> float:
        """One decode token through `layer` at `context` tokens: linear in context between the
        two measured points (attention reads the whole cache), never below the short figure."""
        short, long = self.decode_layer_s[layer], self.decode_layer_long_s[layer]
        if self.long_context == self.short_context:
            return short
        slope = (long - short) / (self.long_context - self.short_context)
        return max(short, short + slope * (context - self.short_context))


@dataclass(frozen=True)
class PowerProfile:
    """A node's power draw: `idle_w` while it waits, `busy_w` while it computes."""

    idle_w: float
    busy_w: float
    basis: str  # "measured (<meter>)" or "estimated (<basis>)"

    @property
    def measured(self) -> bool:
        return self.basis.startswith("measured")


@dataclass(frozen=True)
class NodeProfile:
    name: str
    memory_bytes: int  # usable for weights and KV caches (after memory_gb / Metal limits)
    compute: ComputeProfile
    power: PowerProfile
    machine: str = ""  # catalogue name, when known
    kv_bytes_per_token: int = 0  # KV cache bytes per token of context, whole model (all layers)


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a link, measured with the data plane's own gRPC stack."""

    source: str  # node name, or "coordinator"
    target: str
    latency_s: float  # one-way: median RTT / 2 of a decode-sized message
    latency_p90_s: float  # p90 RTT / 2
    bandwidth_bytes_per_s: float  # from prefill-sized (1-4 MB) messages

    def transfer_s(self, num_bytes: float) -> float:
        """One-way time of a message of `num_bytes`: latency plus serialisation on the wire."""
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s


COORDINATOR = "coordinator"


@dataclass(frozen=True)
class ClusterProfile:
    """Every node's profile and every measured ordered link (node -> node, coordinator -> node)."""

    nodes: tuple[NodeProfile, ...]
    links: Mapping[tuple[str, str], LinkProfile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "links", MappingProxyType(dict(self.links)))

    def __hash__(self) -> int:
        return hash((self.nodes, tuple(sorted(self.links.items()))))

    def node(self, name: str) -> NodeProfile:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes)

    def subset(self, names) -> ClusterProfile:
        """Only the nodes `names` (in this profile's order) and the links among them and from the
        coordinator: a cluster without its spares, or without a lost node."""
        keep = set(names)
        return ClusterProfile(
            tuple(node for node in self.nodes if node.name in keep),
            {
                pair: link
                for pair, link in self.links.items()
                if pair[1] in keep and (pair[0] in keep or pair[0] == COORDINATOR)
            },
        )

    def link(self, source: str, target: str) -> LinkProfile:
        """The measured link; a node to itself costs nothing."""
        if source == target:
            return LinkProfile(source, target, 0.0, 0.0, float("inf"))
        return self.links[(source, target)]


@dataclass(frozen=True)
class Workload:
    """What the placement is optimised for."""

    prompt_tokens: int = 512
    generated_tokens: int = 256
    concurrency: int = 1  # streams decoding at once
    expert_load: ExpertLoad | None = None  # measured routing shares; None: uniform routing

    @property
    def mean_decode_context(self) -> float:
        return self.prompt_tokens + self.generated_tokens / 2
