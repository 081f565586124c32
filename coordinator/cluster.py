"""The cluster as the coordinator runs it: start the nodes, measure them, place the model, load the
shards, wire the data plane, and take it all down again.

Bring-up order: describe the model (no MLX: file headers only) -> launch every node -> wait until
each answers ``Describe`` (bounded) -> measure every node's compute, power and memory and every
link (``coordinator.profiling``) -> place: explicit stages, or the planner's choice for the
objective (``pomona.planner``) -> load all shards
concurrently, streaming progress -> subscribe to every worker's token events -> open the stream to
stage 0. Any failure tears down whatever was started.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from pomona import auth
from pomona.config import ClusterConfig, NodeConfig
from pomona.costmodel import Prediction, predict
from pomona.errors import PomonaError
from pomona.expert_load import add_counts, counts_from_stats, load_history
from pomona.grpc_options import CHANNEL_OPTIONS, message_limit_bytes
from pomona.modelinfo import ModelInfo, describe_model
from pomona.placement import Placement, check_fit, plan_experts, plan_placement
from pomona.planner import Plan, PlanOption, baselines, plan
from pomona.profiles import ClusterProfile, Workload
from pomona.proto import worker_pb2, worker_pb2_grpc
from pomona.tokenizer import load_tokenizer

from . import heartbeat
from .energy import EnergyAccount
from .launch import WorkerProcess, launch_worker, wait_until_reachable
from .load_request import load_request, micro_batch_count
from .profiling import NodeMeasurement, profile_cluster
from .recovery import recover
from .requests import RequestLimits, RequestRouter

log = logging.getLogger(__name__)

# How long a node may take to answer after launch (Python + MLX import is several seconds on a
# slow machine), and how long an already-running ("manual") node gets.
LAUNCHED_NODE_TIMEOUT_S = 90.0
MANUAL_NODE_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 1800.0
DEFAULT_MAX_CONTEXT = 4096  # KV budget per stream when generation.max_context is not set


async def _gather_all(awaitables) -> None:
    """Run all to completion (so nothing is still starting during teardown); raise the first error."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


@dataclass
class NodeState:
    config: NodeConfig
    process: WorkerProcess | None = None
    info: worker_pb2.NodeInfo | None = None
    channel: grpc.aio.Channel | None = None
    stub: worker_pb2_grpc.WorkerStub | None = None
    state: str = "starting"  # starting, profiled, loading, ready, failed
    load_fraction: float = 0.0
    parameter_bytes: int = 0
    rss_bytes: int = 0


@dataclass
class Cluster:
    config: ClusterConfig
    log_dir: Path
    state_dir: Path | None = None  # where the expert-load history lives (`pomona.expert_load`)
    token: str = ""  # the cluster's secret; "" means auth.cluster_token(config)
    state: str = "starting"  # starting, profiling, loading, ready, degraded, failed, stopping
    power_notes: dict[str, str] = field(default_factory=dict)  # node -> why its power is estimated
    error: str = ""
    message: str = ""
    model: ModelInfo | None = None
    placement: Placement | None = None
    router: RequestRouter | None = None
    nodes: dict[str, NodeState] = field(default_factory=dict)
    # The scheduler's inputs and outputs (set during bring-up).
    profile: ClusterProfile | None = None
    energy: EnergyAccount | None = None
    plan: Plan | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _first_stage_call: grpc.aio.StreamUnaryCall | None = None
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _lost: dict[str, str] = field(default_factory=dict)  # unreachable node -> why
    _lost_replicas: dict[str, str] = field(default_factory=dict)  # lost, but replicas cover it
    _retired: dict[str, str] = field(default_factory=dict)  # lost, and recovered from
    kv_tokens: int = 0  # context tokens each node keeps room for (set when placed)
    # Per node: the task reading its Results stream, and the one sending it heartbeats.
    _results: dict[str, asyncio.Task] = field(default_factory=dict)
    _heartbeats: dict[str, asyncio.Task] = field(default_factory=dict)

    # The plan's parts, for status (empty until the cluster is placed).
    @property
    def objective(self) -> str:
        return self.plan.objective if self.plan else ""

    @property
    def prediction(self) -> Prediction | None:
        return self.plan.chosen.prediction if self.plan else None

    @property
    def left_out(self) -> dict[str, str]:
        return self.plan.left_out if self.plan else {}

    @property
    def baselines(self) -> tuple[PlanOption, ...]:
        return self.plan.baselines if self.plan else ()

    def __post_init__(self) -> None:
        self.token = self.token or auth.cluster_token(self.config)
        self.secrets = auth.cluster_secrets(self.config, self.token)  # the coordinator's own

    # -- bring-up ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring the cluster up; on failure record why, tear down, and re-raise."""
        try:
            await self._start()
        except BaseException as error:
            self.state = "failed"
            self.error = str(error) if isinstance(error, PomonaError) else repr(error)
            log.error("cluster start failed: %s", self.error)
            await self.stop()
            self.state = "failed"
            raise

    async def _start(self) -> None:
        self.message = "reading the model"
        self.model = await asyncio.to_thread(describe_model, self.config.model)
        tokenizer = await asyncio.to_thread(load_tokenizer, self.model.path)
        self.nodes = {node.name: NodeState(node) for node in self.config.nodes}
        self.message = f"starting {len(self.nodes)} nodes"
        await _gather_all(self._bring_up(state) for state in self.nodes.values())
        await self._measure()
        self._place()
        self.state, self.message = "loading", "loading shards"
        self.router = RequestRouter(
            tokenizer,
            RequestLimits(
                # generation.max_context bounds each stream's KV cache, so it bounds prompts too.
                context_length=min(self.model.context_length, self.config.generation.max_context or 1 << 30),
                default_max_tokens=self.config.generation.max_tokens,
                prefill_chunk_tokens=self.config.generation.prefill_chunk_tokens,
                max_batch=self.config.generation.max_batch,
            ),
            self._send_to_first_stage,
        )
        self.router.recovers = self.config.recovery
        await _gather_all(self._load(node) for node in self.placement.nodes)
        # Every node, expert-only ones too: a broken Results stream is how the coordinator learns
        # that a node is gone.
        await self._subscribe(self.placement.nodes)
        first = self.nodes[self.placement.stages[0].node]
        self._first_stage_call = first.stub.Forward(wait_for_ready=True)
        powers = {name: self.profile.node(name).power for name in self.placement.nodes}
        self.energy = EnergyAccount(powers, self.worker_counters, lambda: self.router.tokens_produced)
        self.router.energy = self.energy
        self.energy.origin = await self.energy.snapshot()
        self.state, self.message = "ready", "ready"
        for name in self.placement.nodes:  # a hung node keeps its sockets: ask it, often
            self._watch_heartbeat(name)

    def _watch_heartbeat(self, name: str) -> None:
        if (old := self._heartbeats.get(name)) is not None:
            old.cancel()
        task = asyncio.create_task(heartbeat.watch(name, self.nodes[name].stub, self._node_lost))
        self._heartbeats[name] = task
        self._tasks.append(task)

    async def _measure(self) -> None:
        """Profile every node's compute and power and every link (see coordinator.profiling)."""
        self.state, self.message = "profiling", "measuring compute, power and links"
        infos = {name: state.info for name, state in self.nodes.items()}
        stubs = {name: state.stub for name, state in self.nodes.items()}

        def on_node(name: str, measurement: NodeMeasurement) -> None:
            how = "from its cache" if measurement.cached else f"in {measurement.elapsed_s:.1f} s"
            power = measurement.profile.power.basis
            if measurement.power_note:
                power += f"; no power meter ({measurement.power_note})"
                self.power_notes[name] = f"no power meter ({measurement.power_note})"
            self.message = f"node {name!r} profiled {how}; power {power}"
            self.nodes[name].state = "profiled"

        self.profile, _ = await profile_cluster(self.config, self.model, infos, stubs, on_node)

    def _place(self) -> None:
        """Explicit stages from cluster.yaml, or the planner's choice for the objective."""
        settings, generation = self.config.scheduler, self.config.generation
        workload = Workload(
            settings.prompt_tokens,
            settings.generated_tokens,
            settings.concurrency,
            load_history(self.state_dir, self.model),
        )
        max_context = generation.max_context or min(self.model.context_length, DEFAULT_MAX_CONTEXT)
        kv_tokens = self.kv_tokens = max_context * settings.concurrency
        capacities = {node.name: node.memory_bytes for node in self.profile.nodes}
        # Spares serve only after a loss (coordinator.recovery), unless named in placement.stages.
        serving = self.profile.subset(node.name for node in self.config.nodes if not node.spare)
        if self.config.stages is not None:
            placement = plan_placement(self.config, self.model, capacities)
            prediction = predict(self.model, placement, self.profile, workload)
            chosen = PlanOption("explicit", placement, prediction, "placement.stages in cluster.yaml")
            self.plan = Plan(
                chosen,
                "explicit",
                workload,
                baselines=baselines(self.model, self.profile, workload, kv_tokens),
            )
        else:
            self.plan = plan(
                self.model, serving, workload, settings.objective, settings.slack, kv_tokens
            )
            if self.config.experts:  # explicit expert groups on the planned stages
                stages = self.plan.chosen.placement.stages
                placement = Placement(stages, plan_experts(self.config, self.model, stages, capacities))
                check_fit(self.model, placement, capacities)
                prediction = predict(self.model, placement, self.profile, workload)
                chosen = replace(self.plan.chosen, placement=placement, prediction=prediction)
                self.plan = replace(self.plan, chosen=chosen)
        self.placement = self.plan.chosen.placement

    async def measure_and_plan(self) -> Plan:
        """`pomona plan`: start the nodes, measure, plan, and stop them again; nothing loads."""
        try:
            self.model = await asyncio.to_thread(describe_model, self.config.model)
            self.nodes = {node.name: NodeState(node) for node in self.config.nodes}
            await _gather_all(self._bring_up(state) for state in self.nodes.values())
            await self._measure()
            self._place()
            return self.plan
        finally:
            await self.stop()

    async def _subscribe(self, names) -> None:
        subscribed = {name: asyncio.Event() for name in names}
        for name, event in subscribed.items():
            self._results[name] = asyncio.create_task(self._consume_results(name, event))
            self._tasks.append(self._results[name])
        # Tokens published before a subscription would be lost: wait until all are in place.
        waits = asyncio.gather(*(e.wait() for e in subscribed.values()))
        await asyncio.wait_for(waits, LOAD_TIMEOUT_S)

    async def _bring_up(self, state: NodeState) -> None:
        node = state.config
        model = self.model
        message_bytes = message_limit_bytes(
            model.hidden_size, self.config.generation.prefill_chunk_tokens, model.experts_per_token
        )
        node_secrets = auth.cluster_secrets(self.config, self.token, node)
        state.process = await launch_worker(node, self.log_dir, node_secrets, message_bytes)
        timeout_s = MANUAL_NODE_TIMEOUT_S if state.process is None else LAUNCHED_NODE_TIMEOUT_S
        state.info = await wait_until_reachable(node, timeout_s, self.secrets, state.process)
        state.channel = auth.aio_channel(node.address, CHANNEL_OPTIONS, self.secrets)
        state.stub = worker_pb2_grpc.WorkerStub(state.channel)
        state.state = "up"

    async def _load(self, node: str) -> None:
        state = self.nodes[node]
        state.state = "loading"
        addresses = {name: state.config.address for name, state in self.nodes.items()}
        infos = {stage.node: self.nodes[stage.node].info for stage in self.placement.stages}
        hostnames = [info.hostname if info else node for node, info in infos.items()]
        micro_batches = micro_batch_count(self.config.generation.micro_batches, hostnames)
        request = load_request(
            str(self.model.path), self.placement, addresses, node, micro_batches,
            self.config.generation.prompt_cache_tokens,
        )
        if self._on_ring:
            request.transport = "mlx-ring"
            request.ring_hosts[:] = await asyncio.to_thread(self._ring_hosts)
        what = f"layers [{request.layer_start}, {request.layer_end})"
        if request.experts_only:
            what = "its experts"
        async for progress in state.stub.LoadShard(request, timeout=LOAD_TIMEOUT_S):
            if progress.error:
                state.state = "failed"
                raise PomonaError(f"node {node!r} could not load {what}: {progress.error}")
            state.load_fraction = progress.fraction
            if progress.done:
                state.parameter_bytes = progress.parameter_bytes
                state.rss_bytes = progress.rss_bytes
                state.state = "ready"

    def _ring_hosts(self) -> list[str]:
        """Each stage's "ip:port" on the mx.distributed ring, in stage order: the node's host
        (as IPv4, the only family MLX's ring backend binds) and the port its worker reported."""
        hosts = []
        for stage in self.placement.stages:
            state = self.nodes[stage.node]
            host = state.config.host
            try:
                ip = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            except OSError as error:
                raise PomonaError(
                    f"transport mlx-ring: node {stage.node!r} host {host!r} has no IPv4 address "
                    f"({error}); MLX's ring backend needs one: give the node's IPv4 address as its "
                    "host, or use `transport: grpc`"
                ) from None
            if not state.info or not state.info.ring_port:
                raise PomonaError(
                    f"transport mlx-ring: the worker on node {stage.node!r} reported no ring port "
                    "(an older Pomona?); install this version on every node, or use `transport: grpc`"
                )
            hosts.append(f"{ip}:{state.info.ring_port}")
        return hosts

    # -- the data plane, coordinator side ------------------------------------------------------

    async def _send_to_first_stage(self, message: worker_pb2.StageMessage) -> None:
        if self.state == "recovering":
            raise PomonaError(f"the cluster is {self.message}; retry in a few seconds")
        if self._lost:
            raise PomonaError(self.error)
        async with self._send_lock:  # one writer at a time on the stream
            try:
                await self._first_stage_call.write(message)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, AttributeError) as error:
                name = self.placement.stages[0].node
                details = error.details() if isinstance(error, grpc.aio.AioRpcError) else "closed"
                self._node_lost(name, details)
                raise PomonaError(self.error or f"node {name!r} is unreachable") from None

    def _node_lost(self, name: str, details: str) -> None:
        """A node stopped answering: fail what is in flight, refuse new requests (one message
        naming the node) until it answers again with its shard loaded."""
        if self.state not in ("ready", "degraded") or name in self._lost:
            return
        if name in self._retired or name in self._lost_replicas:
            return  # already recovered from, or its replicas serve
        node = self.nodes[name]
        if self._replicas_cover(name):
            # Its experts all have live replicas: the stages' dispatch goes to those at once.
            node.state = "unreachable"
            self._lost_replicas[name] = details
            log.warning("expert node %r is unreachable (%s); its replicas serve its experts", name, details)
            return
        if self.state == "ready" and self._recovers_from(name):
            self._lost[name] = details
            node.state = "lost"
            self._tasks.append(asyncio.create_task(recover(self, name)))
            return
        self._lost[name] = details
        node.state = "unreachable"
        self.state = "degraded"
        lost = ", ".join(f"{n!r} at {self.nodes[n].config.address} ({why})" for n, why in self._lost.items())
        self.error = (
            f"node {lost} is unreachable; requests are refused until it answers again "
            "(if its worker died: `pomona down`, then `pomona up`)"
        )
        log.error(self.error)
        self.router.fail_all(self.error)
        # A hung node's streams may still be open: close its subscription, so that a node that
        # comes back is subscribed once, not twice.
        results = self._results.pop(name, None)
        if results is not None and results is not asyncio.current_task():
            results.cancel()
        self._tasks.append(asyncio.create_task(self._watch_lost(name)))

    @property
    def _on_ring(self) -> bool:
        """Whether the stages talk over an mx.distributed ring (one stage has no ring)."""
        return self.config.transport == "mlx-ring" and len(self.placement.stages) > 1

    def _recovers_from(self, name: str) -> bool:
        """Whether losing ``name`` starts a recovery: not for a stage on an mx.distributed ring,
        which MLX cannot re-form without new workers (the error says to restart)."""
        on_ring_stage = self._on_ring and any(s.node == name for s in self.placement.stages)
        return self.config.recovery and not on_ring_stage

    def reopen_first_stage(self) -> None:
        """A new stream to stage 0 (after a recovery moved it, or to be sure it is fresh)."""
        if self._first_stage_call is not None:
            self._first_stage_call.cancel()
        first = self.nodes[self.placement.stages[0].node]
        self._first_stage_call = first.stub.Forward(wait_for_ready=True)

    def watch_heartbeats(self) -> None:
        """Heartbeats for every serving node not yet watched (after a recovery added some)."""
        for name in self.placement.nodes:
            task = self._heartbeats.get(name)
            if task is None or task.done():
                self._watch_heartbeat(name)

    def retire(self, name: str) -> None:
        """`name` was lost and the cluster recovered without it: it no longer counts as lost."""
        self._retired[name] = self._lost.pop(name, "")
        for tasks in (self._results, self._heartbeats):
            task = tasks.pop(name, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    def _replicas_cover(self, name: str) -> bool:
        """Whether `name` runs no stage and every expert it holds has a holder still answering."""
        placement = self.placement
        if placement is None or any(stage.node == name for stage in placement.stages):
            return False
        gone = {name, *self._lost, *self._lost_replicas}
        held = [(layer, e) for layer, experts in placement.experts.items() for e, nodes in experts.items()
                if name in nodes]
        return bool(held) and all(
            set(placement.experts.holders(layer, e)) - gone for layer, e in held
        )

    async def _watch_lost(self, name: str) -> None:
        """Poll a lost node; once it answers with its shard still loaded (it was cut off, not
        restarted), subscribe again and serve again."""
        node = self.nodes[name]
        while self._lost.get(name) is not None and self.state == "degraded":
            await asyncio.sleep(1.0)
            try:
                status = await node.stub.Status(worker_pb2.StatusRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                continue
            if status.parameter_bytes != node.parameter_bytes:
                continue  # restarted: its shard is gone, a reload is needed (see the error)
            await self._subscribe([name])
            if name == self.placement.stages[0].node:
                if self._first_stage_call is not None:
                    self._first_stage_call.cancel()  # a hung stage 0 may still hold the old one
                self._first_stage_call = node.stub.Forward(wait_for_ready=True)
            del self._lost[name]
            node.state = "ready"
            self._watch_heartbeat(name)
            if not self._lost:
                self.state, self.error = "ready", ""
                log.info("node %r answers again: the cluster is ready", name)

    async def _consume_results(self, node_name: str, subscribed: asyncio.Event) -> None:
        stub = self.nodes[node_name].stub
        try:
            async for message in stub.Results(worker_pb2.ResultsRequest()):
                if not message.events:
                    subscribed.set()
                    continue
                for event in message.events:
                    self.router.dispatch(event)
        except grpc.aio.AioRpcError as error:
            self._node_lost(node_name, error.details() or str(error.code()))

    # -- status and teardown -------------------------------------------------------------------

    async def worker_status(self, node_name: str) -> worker_pb2.WorkerStatus | None:
        try:
            return await self.nodes[node_name].stub.Status(worker_pb2.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None

    async def worker_counters(
        self, node_name: str, timeout_s: float = 5.0
    ) -> worker_pb2.WorkerStatus | None:
        """Busy time and energy only: answered without waiting for the node's engine."""
        try:
            request = worker_pb2.StatusRequest(counters_only=True)
            return await self.nodes[node_name].stub.Status(request, timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return None

    async def expert_stats(self, node_name: str) -> worker_pb2.ExpertStatsReply | None:
        try:
            request = worker_pb2.ExpertStatsRequest()
            return await self.nodes[node_name].stub.ExpertStats(request, timeout=5)
        except grpc.aio.AioRpcError:
            return None

    async def save_expert_load(self) -> None:
        """Add what every node's experts computed to the model's expert-load history, so the next
        plan of this model places by it. Best effort: a node that does not answer is skipped."""
        if self.state_dir is None or self.model is None or not self.model.is_moe:
            return
        if self.placement is None or self.router is None:
            return
        replies = await asyncio.gather(*(self.expert_stats(name) for name in self.placement.nodes))
        counts = counts_from_stats(reply for reply in replies if reply is not None)
        if any(sum(experts.values()) for experts in counts.values()):
            path = await asyncio.to_thread(add_counts, self.state_dir, self.model, counts)
            log.info("expert load added to %s", path)

    async def stop(self) -> None:
        """Stop every node this cluster started; safe to call more than once."""
        if self.state in ("ready", "degraded"):
            try:
                await self.save_expert_load()
            except OSError as error:
                log.warning("could not save the expert load: %s", error)
        self.state = "stopping"
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._first_stage_call is not None:
            self._first_stage_call.cancel()
            self._first_stage_call = None
        for state in self.nodes.values():
            if state.stub is not None and state.process is None:
                # A node we did not start keeps running; just free what it holds for us.
                try:
                    await state.stub.Release(worker_pb2.ReleaseRequest(), timeout=5)
                except grpc.aio.AioRpcError:
                    pass
        await asyncio.gather(
            *(state.process.stop() for state in self.nodes.values() if state.process is not None)
        )
        for state in self.nodes.values():
            if state.channel is not None:
                await state.channel.close()
                state.channel = None
