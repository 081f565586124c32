"""The coordinator's gRPC service: thin conversions between proto messages and the cluster."""

from __future__ import annotations

import asyncio
import logging

import grpc

from pomona.errors import PomonaError
from pomona.proto import coordinator_pb2, coordinator_pb2_grpc

from .cluster import Cluster
from .requests import RequestError

log = logging.getLogger(__name__)


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, cluster: Cluster, stop_event: asyncio.Event):
        self.cluster = cluster
        self._stop_event = stop_event

    async def Generate(self, request, context):
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
        stages = cluster.placement.stages if cluster.placement else ()
        live = {}
        if request.include_workers and cluster.state == "ready":
            replies = await asyncio.gather(*(cluster.worker_status(s.node) for s in stages))
            live = dict(zip((s.node for s in stages), replies))
        for stage in stages:
            node = cluster.nodes[stage.node]
            info = coordinator_pb2.StageInfo(
                node=stage.node,
                address=node.config.address,
                layer_start=stage.layers.start,
                layer_end=stage.layers.end,
                is_first=stage.is_first,
                is_last=stage.is_last,
                parameter_bytes=node.parameter_bytes,
                rss_bytes=node.rss_bytes,
                memory_total_bytes=node.info.memory_total_bytes if node.info else 0,
                state=node.state,
                load_fraction=node.load_fraction,
            )
            worker = live.get(stage.node)
            if request.include_workers and cluster.state == "ready":
                if worker is None:
                    info.state = "unreachable"
                else:
                    info.rss_bytes = worker.rss_bytes
                    info.active_requests = worker.active_requests
            status.stages.append(info)
        return status

    async def StopCluster(self, request, context):
        self._stop_event.set()
        return coordinator_pb2.StopClusterReply()
