"""The cluster as the coordinator runs it: start the nodes, measure them, place the model, load the
shards, wire the data plane, and take it all down again.

Bring-up order: describe the model (no MLX: file headers only) -> launch every node -> wait until
each answers ``Describe`` (bounded) -> plan the placement from the nodes' memory -> load all shards
concurrently, streaming progress -> subscribe to every worker's token events -> open the stream to
stage 0. Any failure tears down whatever was started.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pomona.config import ClusterConfig, NodeConfig
from pomona.errors import PomonaError
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.modelinfo import ModelInfo, describe_model
from pomona.placement import Placement, StagePlacement, plan_placement
from pomona.proto import worker_pb2, worker_pb2_grpc
from pomona.tokenizer import load_tokenizer

from .launch import WorkerProcess, launch_worker, wait_until_reachable
from .requests import RequestLimits, RequestRouter

log = logging.getLogger(__name__)

# How long a node may take to answer after launch (Python + MLX import is several seconds on a
# slow machine), and how long an already-running ("manual") node gets.
LAUNCHED_NODE_TIMEOUT_S = 90.0
MANUAL_NODE_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 1800.0


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
    state: str = "starting"  # starting, loading, ready, failed
    load_fraction: float = 0.0
    parameter_bytes: int = 0
    rss_bytes: int = 0


@dataclass
class Cluster:
    config: ClusterConfig
    log_dir: Path
    state: str = "starting"  # starting, loading, ready, failed, stopping
    error: str = ""
    message: str = ""
    model: ModelInfo | None = None
    placement: Placement | None = None
    router: RequestRouter | None = None
    nodes: dict[str, NodeState] = field(default_factory=dict)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _first_stage_call: grpc.aio.StreamUnaryCall | None = None
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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
        capacities = {
            name: int(state.config.memory_gb * 2**30)
            if state.config.memory_gb
            else state.info.memory_available_bytes
            for name, state in self.nodes.items()
        }
        self.placement = plan_placement(self.config, self.model, capacities)
        self.state, self.message = "loading", "loading shards"
        await _gather_all(self._load(stage) for stage in self.placement.stages)
        for stage in self.placement.stages:
            self._tasks.append(asyncio.create_task(self._consume_results(stage.node)))
        first = self.nodes[self.placement.stages[0].node]
        self._first_stage_call = first.stub.Forward(wait_for_ready=True)
        generation = self.config.generation
        self.router = RequestRouter(
            tokenizer,
            RequestLimits(
                context_length=self.model.context_length,
                default_max_tokens=generation.max_tokens,
                prefill_chunk_tokens=generation.prefill_chunk_tokens,
            ),
            self._send_to_first_stage,
        )
        self.state, self.message = "ready", "ready"

    async def _bring_up(self, state: NodeState) -> None:
        node = state.config
        state.process = await launch_worker(node, self.log_dir)
        timeout_s = MANUAL_NODE_TIMEOUT_S if state.process is None else LAUNCHED_NODE_TIMEOUT_S
        state.info = await wait_until_reachable(node, timeout_s, state.process)
        state.channel = grpc.aio.insecure_channel(node.address, options=CHANNEL_OPTIONS)
        state.stub = worker_pb2_grpc.WorkerStub(state.channel)
        state.state = "up"

    def _stage_request(self, stage: StagePlacement, index: int) -> worker_pb2.LoadShardRequest:
        stages = self.placement.stages
        next_stage = stages[(index + 1) % len(stages)]
        return worker_pb2.LoadShardRequest(
            model_path=str(self.model.path),
            layer_start=stage.layers.start,
            layer_end=stage.layers.end,
            is_first=stage.is_first,
            is_last=stage.is_last,
            next_address=self.nodes[next_stage.node].config.address,
            stage_index=index,
            stage_count=len(stages),
        )

    async def _load(self, stage: StagePlacement) -> None:
        index = self.placement.stages.index(stage)
        state = self.nodes[stage.node]
        state.state = "loading"
        request = self._stage_request(stage, index)
        async for progress in state.stub.LoadShard(request, timeout=LOAD_TIMEOUT_S):
            if progress.error:
                state.state = "failed"
                raise PomonaError(
                    f"node {stage.node!r} could not load layers {stage.layers}: {progress.error}"
                )
            state.load_fraction = progress.fraction
            if progress.done:
                state.parameter_bytes = progress.parameter_bytes
                state.rss_bytes = progress.rss_bytes
                state.state = "ready"

    # -- the data plane, coordinator side ------------------------------------------------------

    async def _send_to_first_stage(self, message: worker_pb2.StageMessage) -> None:
        async with self._send_lock:  # one writer at a time on the stream
            await self._first_stage_call.write(message)

    async def _consume_results(self, node_name: str) -> None:
        stub = self.nodes[node_name].stub
        try:
            async for event in stub.Results(worker_pb2.ResultsRequest()):
                self.router.dispatch(event)
        except grpc.aio.AioRpcError as error:
            if self.state == "ready":
                reason = f"lost contact with node {node_name!r}: {error.details()}"
                log.error(reason)
                self.router.fail_all(reason)

    # -- status and teardown -------------------------------------------------------------------

    async def worker_status(self, node_name: str) -> worker_pb2.WorkerStatus | None:
        try:
            return await self.nodes[node_name].stub.Status(worker_pb2.StatusRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None

    async def stop(self) -> None:
        """Stop every node this cluster started; safe to call more than once."""
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
