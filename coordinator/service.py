"""The coordinator's gRPC service: thin conversions between proto messages and the cluster."""

from __future__ import annotations

import asyncio
import logging

import grpc

from pomona.costmodel import Prediction
from pomona.errors import PomonaError
from pomona.placement import expert_groups
from pomona.planner import PlanOption
from pomona.proto import coordinator_pb2, coordinator_pb2_grpc

from .cluster import Cluster
from .energy import combined_basis
from .requests import RequestError

log = logging.getLogger(__name__)


def prediction_message(prediction: Prediction) -> coordinator_pb2.Prediction:
    return coordinator_pb2.Prediction(
        decode_tok_s=prediction.decode_tok_s,
        ttft_s=prediction.ttft_s,
        throughput_tok_s=prediction.throughput_tok_s,
        j_per_token=prediction.j_per_token,
        energy_basis=prediction.energy_basis,
        bottleneck=prediction.bottleneck,
    )


def option_message(option: PlanOption) -> coordinator_pb2.PlanOptionInfo:
    message = coordinator_pb2.PlanOptionInfo(name=option.name, note=option.note)
    if option.placement is not None:
        for stage in option.placement.stages:
            message.stages.add(
                node=stage.node,
                layer_start=stage.layers.start,
                layer_end=stage.layers.end,
                is_first=stage.is_first,
                is_last=stage.is_last,
            )
    if option.prediction is not None:
        message.predicted.CopyFrom(prediction_message(option.prediction))
    return message


def _add_predictions(cluster: Cluster, name: str, info: coordinator_pb2.StageInfo) -> None:
    if cluster.prediction is None:
        return
    for stage in cluster.prediction.stages:
        if stage.node == name:
            info.predicted_compute_s = stage.decode_compute_s
            info.next_node = stage.next_node
            link = cluster.profile.links.get((name, stage.next_node)) if stage.next_node != name else None
            info.hop_latency_s = link.latency_s if link is not None else 0.0
    for node in cluster.prediction.nodes:
        if node.node == name and not info.power_basis:
            info.power_basis = node.power_basis


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, cluster: Cluster, stop_event: asyncio.Event):
        self.cluster = cluster
        self._stop_event = stop_event

    async def Generate(self, request, context):
        if self.cluster.state == "degraded":
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.cluster.error)
        if self.cluster.state != "ready":
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the cluster is not ready (state: {self.cluster.state}); see `pomona status`",
            )
        try:
            async for chunk in self.cluster.router.generate(request):
                yield chunk
        except RequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except PomonaError as error:
            await context.abort(grpc.StatusCode.INTERNAL, str(error))

    async def GetStatus(self, request, context):
        cluster = self.cluster
        status = coordinator_pb2.ClusterStatus(
            state=cluster.state,
            error=cluster.error,
            message=cluster.message,
            model=str(cluster.model.path) if cluster.model else cluster.config.model,
            architecture=cluster.model.architecture if cluster.model else "",
            num_layers=cluster.model.num_layers if cluster.model else 0,
            active_requests=cluster.router.active_requests if cluster.router else 0,
        )
        placement = cluster.placement
        names = placement.nodes if placement else ()
        live = {}
        if request.include_workers and cluster.state in ("ready", "degraded"):
            replies = await asyncio.gather(*(cluster.worker_status(name) for name in names))
            live = dict(zip(names, replies))
        stages = {stage.node: stage for stage in placement.stages} if placement else {}
        for name in names:
            node, stage = cluster.nodes[name], stages.get(name)
            info = coordinator_pb2.StageInfo(
                node=name,
                address=node.config.address,
                layer_start=stage.layers.start if stage else 0,
                layer_end=stage.layers.end if stage else 0,
                is_first=bool(stage and stage.is_first),
                is_last=bool(stage and stage.is_last),
                experts_only=stage is None,
                parameter_bytes=node.parameter_bytes,
                rss_bytes=node.rss_bytes,
                memory_total_bytes=node.info.memory_total_bytes if node.info else 0,
                state=node.state,
                load_fraction=node.load_fraction,
            )
            worker = live.get(name)
            if request.include_workers and cluster.state in ("ready", "degraded"):
                if worker is None:
                    info.state = "unreachable"
                else:
                    info.rss_bytes = worker.rss_bytes
                    info.active_requests = worker.active_requests
                    info.cache_bytes = worker.cache_bytes
                    info.prompt_cache_bytes = worker.prompt_cache_bytes
                    info.batch_steps, info.batch_rows = worker.batch_steps, worker.batch_rows
                    info.decode_steps, info.decode_busy_s = worker.decode_steps, worker.decode_busy_s
                    if worker.decode_steps:
                        info.measured_compute_s = worker.decode_busy_s / worker.decode_steps
            _add_predictions(cluster, name, info)
            status.stages.append(info)
        if placement is not None:
            for node, layer, ids in expert_groups(placement.experts):
                status.expert_groups.add(node=node, layer=layer, expert_ids=ids)
        status.objective = cluster.objective
        if cluster.prediction is not None:
            status.predicted.CopyFrom(prediction_message(cluster.prediction))
        for node, reason in cluster.left_out.items():
            status.left_out.add(node=node, reason=reason)
        if cluster.plan is not None:
            status.plan_note = cluster.plan.chosen.note
            load = cluster.plan.workload.expert_load
            if load is not None:
                status.expert_load = f"{load.tokens} routed tokens, {load.source}"
        for option in cluster.baselines:
            status.baselines.append(option_message(option))
        status.power_notes.extend(f"{node}: {note}" for node, note in sorted(cluster.power_notes.items()))
        if request.include_workers and cluster.state == "ready" and cluster.energy is not None:
            now = await cluster.energy.snapshot()
            nodes = cluster.energy.between(cluster.energy.origin, now)
            by_node = {n.node: n for n in nodes}
            for info in status.stages:
                if info.node in by_node:
                    info.energy_j, info.power_w = by_node[info.node].energy_j, by_node[info.node].watts
                    info.power_basis = by_node[info.node].basis
            status.energy_j = sum(n.energy_j for n in nodes)
            status.energy_basis = combined_basis([n.basis for n in nodes]) if nodes else ""
        return status

    async def GetExpertStats(self, request, context):  # noqa: N802 (gRPC's method names)
        cluster = self.cluster
        if cluster.state != "ready":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the cluster is {cluster.state}")
        names = cluster.placement.nodes
        replies = await asyncio.gather(*(cluster.expert_stats(name) for name in names))
        result = coordinator_pb2.ClusterExpertStats()
        for name, reply in zip(names, replies):
            if reply is not None:
                result.nodes.add(node=name, stats=reply)
        return result

    async def StopCluster(self, request, context):
        self._stop_event.set()
        return coordinator_pb2.StopClusterReply()
