"""What the HTTP API shows about serving: Prometheus metrics (`GET /metrics`) and the JSON the web
page polls (`GET /api/cluster`).

Request-side figures (requests, tokens, time to first token, inter-token latency, queue depth,
active requests) are recorded as requests run. Cluster-side figures (per-stage compute and batch
size, per-link latency, memory and KV cache, power and energy labelled `measured` or
`estimated`, expert load) come from one snapshot of the coordinator's own status and expert
statistics (the same answers as `pomona status --json` and `pomona status --experts`), taken at
most once a second however often it is asked.
"""

from __future__ import annotations

import asyncio
import math
import time

from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pomona.proto import coordinator_pb2

SNAPSHOT_MAX_AGE_S = 1.0
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _source(basis: str) -> str:
    return "measured" if basis.startswith("measured") else "estimated"


def finite(value):
    """`value` with every non-finite float (an unmeasurably fast loopback link's bandwidth, say)
    as None, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def _dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class ServingMetrics:
    def __init__(self, cluster, service):
        self.cluster, self.service = cluster, service
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "pomona_requests",
            "HTTP generation requests by API and outcome",
            ["api", "outcome"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "pomona_prompt_tokens", "Prompt tokens of finished requests", registry=registry
        )
        self.generated_tokens = Counter("pomona_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram(
            "pomona_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inter_token = Histogram(
            "pomona_inter_token_seconds",
            "Between consecutive tokens of a request",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "pomona_queue_depth", "Requests waiting for a generation slot", registry=registry
        )
        self.active = Gauge("pomona_active_requests", "Requests generating now", registry=registry)
        registry.register(_ClusterCollector(self))
        self.status: coordinator_pb2.ClusterStatus | None = None
        self.experts: coordinator_pb2.ClusterExpertStats | None = None
        self._taken_at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Take a new cluster snapshot unless the last is younger than SNAPSHOT_MAX_AGE_S."""
        async with self._lock:
            if time.monotonic() - self._taken_at < SNAPSHOT_MAX_AGE_S:
                return
            request = coordinator_pb2.ClusterStatusRequest(include_workers=True)
            self.status = await self.service.GetStatus(request, None)
            self.experts = None
            if self.cluster.state == "ready":
                self.experts = await self.service.GetExpertStats(coordinator_pb2.ExpertStatsQuery(), None)
            self._taken_at = time.monotonic()

    async def exposition(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)

    async def cluster_json(self, requests: dict) -> dict:
        """The web page's view: the status, the measured links, expert load, and `requests`
        (the API's own counts: active, queued)."""
        await self.refresh()
        profile = self.cluster.profile
        links = [
            {
                "source": link.source,
                "target": link.target,
                "latency_s": link.latency_s,
                "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
            }
            for link in (profile.links.values() if profile is not None else ())
        ]
        return finite(
            {
                "status": _dict(self.status),
                "links": links,
                "experts": _dict(self.experts) if self.experts is not None else {"nodes": []},
                "requests": requests,
            }
        )


class _ClusterCollector:
    """Families built from the latest snapshot at each scrape (nothing when there is none)."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        status, cluster = self.metrics.status, self.metrics.cluster
        ready = GaugeMetricFamily("pomona_cluster_ready", "1 when the cluster serves requests")
        ready.add_metric([], 1.0 if cluster.state == "ready" else 0.0)
        yield ready
        if status is None:
            return
        compute = GaugeMetricFamily(
            "pomona_stage_compute_seconds", "Compute per decode token of each stage", labels=["node", "kind"]
        )
        memory = GaugeMetricFamily(
            "pomona_node_memory_bytes", "Resident memory of each worker", labels=["node"]
        )
        cache = GaugeMetricFamily(
            "pomona_node_kv_cache_bytes", "KV cache bytes held on each node", labels=["node"]
        )
        kept = GaugeMetricFamily(
            "pomona_node_prompt_cache_bytes", "Prompt cache bytes (finished requests' caches kept)",
            labels=["node"],
        )
        active = GaugeMetricFamily(
            "pomona_node_active_requests", "Requests with caches on each node", labels=["node"]
        )
        power = GaugeMetricFamily(
            "pomona_node_power_watts", "Average power since the cluster came up", labels=["node", "source"]
        )
        energy = CounterMetricFamily(
            "pomona_node_energy_joules", "Energy since the cluster came up", labels=["node", "source"]
        )
        steps = CounterMetricFamily(
            "pomona_stage_decode_steps", "Decode steps (batched forwards) each stage ran", labels=["node"]
        )
        rows = CounterMetricFamily(
            "pomona_stage_decode_rows",
            "Requests in those steps (rows / steps: the batch size)",
            labels=["node"],
        )
        batch = GaugeMetricFamily(
            "pomona_stage_batch_size", "Mean requests per decode step of each stage so far", labels=["node"]
        )
        for stage in status.stages:
            if not stage.experts_only:
                steps.add_metric([stage.node], stage.batch_steps)
                rows.add_metric([stage.node], stage.batch_rows)
                if stage.batch_steps:
                    batch.add_metric([stage.node], stage.batch_rows / stage.batch_steps)
            if stage.measured_compute_s:
                compute.add_metric([stage.node, "measured"], stage.measured_compute_s)
            if stage.predicted_compute_s:
                compute.add_metric([stage.node, "predicted"], stage.predicted_compute_s)
            memory.add_metric([stage.node], stage.rss_bytes)
            cache.add_metric([stage.node], stage.cache_bytes)
            kept.add_metric([stage.node], stage.prompt_cache_bytes)
            active.add_metric([stage.node], stage.active_requests)
            if stage.power_basis:
                power.add_metric([stage.node, _source(stage.power_basis)], stage.power_w)
                energy.add_metric([stage.node, _source(stage.power_basis)], stage.energy_j)
        yield from (compute, memory, cache, kept, active, power, energy, steps, rows, batch)
        links = GaugeMetricFamily(
            "pomona_link_latency_seconds",
            "One-way latency of each link, measured at bring-up",
            labels=["source", "target"],
        )
        for link in cluster.profile.links.values() if cluster.profile is not None else ():
            links.add_metric([link.source, link.target], link.latency_s)
        yield links
        experts = self.metrics.experts
        if experts is not None:
            tokens = CounterMetricFamily(
                "pomona_expert_tokens",
                "Tokens computed by each routed expert",
                labels=["node", "layer", "expert"],
            )
            for node in experts.nodes:
                for layer in node.stats.layers:
                    for expert, count in zip(layer.expert_ids, layer.tokens):
                        tokens.add_metric([node.node, str(layer.layer), str(expert)], count)
            yield tokens


class RequestTimer:
    """Time to first token and inter-token latency of one request, into the histograms."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics
        self.arrived = self.last = time.perf_counter()
        self.tokens = 0

    def on_tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.tokens == 0:
            self.metrics.ttft.observe(now - self.arrived)
        else:
            self.metrics.inter_token.observe(now - self.last)
        self.last = now
        self.tokens += count
        self.metrics.generated_tokens.inc(count)
