"""The worker's gRPC service: converts proto messages and delegates to the engine."""

from __future__ import annotations

import logging
import os
import platform
import queue
import socket
import threading
from collections import defaultdict
from concurrent import futures

import grpc
import mlx.core as mx
import psutil

from pomona import __version__, auth
from pomona.errors import PomonaError
from pomona.grpc_options import MAX_CONCURRENT_RPCS, WORKER_THREADS, server_options
from pomona.power import detect_meter
from pomona.proto import worker_pb2, worker_pb2_grpc

from . import ring
from .dispatch import DISPATCH_TIMEOUT_S
from .engine import StageEngine
from .expert_counts import count_routed_experts
from .link import GrpcLink, Link
from .linkprobe import measure_link
from .stage import ExpertPlan, load_expert_host, load_stage
from .validate import (
    expert_request_problem,
    load_problem,
    measure_problem,
    on_ring,
    profile_problem,
    stream_problem,
)

log = logging.getLogger(__name__)
MAX_EVENTS_PER_MESSAGE = 4096  # token events coalesced into one Results message


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, stop_server, max_message_bytes: int) -> None:
        self.engine = StageEngine(max_message_bytes)
        self._loaded: worker_pb2.LoadShardRequest | None = None  # or being loaded
        self._load_lock = threading.Lock()
        self._stop_server = stop_server
        self._meter = None
        self._meter_lock = threading.Lock()
        self.ring_port = _free_port()  # for the mlx-ring transport (NodeInfo.ring_port)

    def Describe(self, request, context):
        memory = psutil.virtual_memory()
        return worker_pb2.NodeInfo(
            hostname=socket.gethostname(),
            platform=f"{platform.system()} {platform.machine()}",
            memory_total_bytes=memory.total,
            memory_available_bytes=memory.available,
            pid=os.getpid(),
            mlx_device=str(mx.default_device()),
            version=__version__,
            gpu_working_set_bytes=_gpu_working_set_bytes(),
            ring_port=self.ring_port,
        )

    def Profile(self, request, context):
        from .profiling import profile_node  # MLX-heavy: only when asked

        if problem := profile_problem(request):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        job = self.engine.call(lambda: profile_node(request))
        try:
            return job.result(timeout=max(request.time_budget_s, 1.0) * 4 + 60)
        except TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "profiling took too long on this node")
        except PomonaError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

    def MeasureLinks(self, request, context):
        # Off the engine thread: the probe only waits on the network.
        if problem := measure_problem(request, self.engine.max_message_bytes):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        reply = worker_pb2.MeasureLinksReply()
        for target in request.targets:
            reply.links.append(
                measure_link(
                    target.name,
                    target.address,
                    request.small_bytes,
                    request.large_bytes,
                    request.small_rounds,
                    request.large_rounds,
                    request.timeout_s,
                )
            )
        return reply

    def LoadShard(self, request, context):
        with self._load_lock:  # a second Load (even mid-generation) must not drop this one
            problem = load_problem(request, self._loaded)
            if not problem:
                self._loaded = request
        if problem:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        try:
            yield from self._load(request)
        except BaseException:
            self._loaded = None
            raise

    def _load(self, request):
        progress: queue.SimpleQueue = queue.SimpleQueue()

        def report(fraction: float, message: str) -> None:
            progress.put(worker_pb2.LoadProgress(fraction=fraction, message=message))

        def load():
            engine = self.engine
            engine.release()
            held = {group.layer: list(group.expert_ids) for group in request.experts}
            remote: dict[int, dict[str, list[int]]] = defaultdict(dict)
            addresses = {}
            for group in request.remote_experts:
                remote[group.layer][group.node] = list(group.expert_ids)
                addresses[group.node] = group.address
            engine.dispatcher.connect(addresses)
            if on_ring(request):  # first: every stage joins at once, before its weights load
                report(0.0, "joining the mx.distributed ring")
                ring.join(list(request.ring_hosts), request.stage_index, self._deliver)
            stage_layers = range(0) if request.experts_only else range(request.layer_start, request.layer_end)
            stage = None
            if not request.experts_only:
                plan = None
                if remote:
                    own = {layer: ids for layer, ids in held.items() if layer in stage_layers}
                    plan = ExpertPlan(own, dict(remote), engine.dispatcher)
                stage = load_stage(
                    request.model_path,
                    request.layer_start,
                    request.layer_end,
                    request.is_first,
                    request.is_last,
                    progress=report,
                    experts=plan,
                )
                count_routed_experts(stage.layers, stage.layer_indices, engine.expert_stats)
            hosted = {layer: ids for layer, ids in held.items() if layer not in stage_layers}
            if hosted:
                engine.dispatcher.host = load_expert_host(request.model_path, hosted, engine.expert_stats)
                report(1.0, f"experts of layers {sorted(hosted)} loaded")
            next_link = None if request.experts_only else self._connect(request)
            engine.install(
                stage, request.stage_index, request.stage_count, next_link, request.micro_batches,
                request.prompt_cache_tokens,
            )
            return engine.parameter_bytes()

        job = self.engine.call(load)
        job.add_done_callback(lambda _: progress.put(None))
        while (item := progress.get()) is not None:
            yield item
        error = job.exception()
        if error is not None:
            reason = str(error) if isinstance(error, PomonaError) else f"{type(error).__name__}: {error}"
            log.error("loading failed: %s", reason)
            self._loaded = None
            yield worker_pb2.LoadProgress(done=True, error=reason)
            return
        yield worker_pb2.LoadProgress(
            fraction=1.0,
            done=True,
            message="ready",
            parameter_bytes=job.result(),
            rss_bytes=psutil.Process().memory_info().rss,
        )

    def _connect(self, request) -> Link | None:
        if request.stage_count <= 1:
            return None
        engine = self.engine

        def broken(node: str, reason: str) -> None:
            engine.call(lambda: engine.on_next_link_broken(reason))

        name = request.next_node or request.next_address
        if on_ring(request):
            return ring.RingLink(name, request.next_address, ring.current(), on_broken=broken)
        return GrpcLink(name, request.next_address, "stage", on_broken=broken)

    def _admission_problem(self, message) -> str:
        """Why a data-plane message cannot go to the engine ("" if it can)."""
        problem = stream_problem(message)
        starts = message.WhichOneof("body") == "start"
        if not problem and starts and not self.engine.claim(message.request_id):
            problem = f"request id {message.request_id!r} is already in use here; closing this stream"
        return problem

    def _deliver(self, message) -> None:
        """A message the previous stage sent on the ring."""
        if problem := self._admission_problem(message):
            log.warning("dropped a ring message: %s", problem)
            return
        self.engine.submit(message)

    def Status(self, request, context):
        def snapshot():
            stage = self.engine.stage
            return worker_pb2.WorkerStatus(
                loaded=stage is not None,
                layer_start=stage.start if stage else 0,
                layer_end=stage.end if stage else 0,
                is_first=bool(stage and stage.is_first),
                is_last=bool(stage and stage.is_last),
                active_requests=len(self.engine.requests),
                parameter_bytes=self.engine.parameter_bytes(),
                rss_bytes=psutil.Process().memory_info().rss,
                cache_bytes=self.engine.cache_bytes(),
                prompt_cache_bytes=self.engine.prompt_cache.nbytes,
                model_path=self._loaded.model_path if self._loaded else "",
            )

        if request.counters_only:
            status = worker_pb2.WorkerStatus()
        else:
            status = self.engine.call(snapshot).result(timeout=60)
        # Plain numbers the engine only adds to: read here, without waiting for the engine thread.
        status.busy_s, status.decode_busy_s = self.engine.busy_s, self.engine.decode_busy_s
        status.decode_steps = self.engine.decode_steps
        status.batch_steps, status.batch_rows = self.engine.batch_steps, self.engine.batch_rows
        meter = self._power_meter()
        if meter is not None:
            try:
                status.energy_j, status.energy_measured = meter.read_energy_j(), True
                status.power_meter = meter.name
            except (OSError, RuntimeError, ValueError) as error:
                log.warning("power meter %s failed: %s", meter.name, error)
        return status

    def _power_meter(self):
        with self._meter_lock:
            if self._meter is None:
                self._meter = detect_meter() or False  # False: looked, there is none
            return self._meter or None

    def Release(self, request, context):
        self.engine.call(self.engine.release).result(timeout=60)
        self._loaded = None
        return worker_pb2.ReleaseReply()

    def Shutdown(self, request, context):
        threading.Thread(target=self._stop_server, daemon=True).start()
        return worker_pb2.ShutdownReply()

    def Forward(self, request_iterator, context):
        for message in request_iterator:
            # A problem means the sender is broken: its stream goes, every other request runs on.
            if problem := self._admission_problem(message):
                log.warning("refused a data-plane stream from %s: %s", context.peer(), problem)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            self.engine.submit(message)
        return worker_pb2.ForwardReply()

    def Ping(self, request_iterator, context):
        yield from request_iterator

    def Experts(self, request_iterator, context):
        engine = self.engine
        for request in request_iterator:
            if problem := expert_request_problem(request, engine.dispatcher.host, engine.max_message_bytes):
                yield worker_pb2.ExpertReply(error=problem, dispatch_id=request.dispatch_id)
                continue
            if engine.experts_only:
                yield engine.compute_expert_here(request)
                continue
            try:
                yield engine.submit_expert(request).result(timeout=DISPATCH_TIMEOUT_S)
            except TimeoutError:
                yield worker_pb2.ExpertReply(
                    error="expert computation timed out", dispatch_id=request.dispatch_id
                )

    def ExpertStats(self, request, context):
        with self.engine.mlx_lock:  # it reads counters kept on the device
            return self.engine.expert_stats.to_proto()

    def Results(self, request, context):
        subscriber = self.engine.results.subscribe()
        yield worker_pb2.TokenEvents()  # "subscribed": events from now on reach this stream
        try:
            while context.is_active():
                try:
                    events = list(subscriber.get(timeout=0.5))
                except queue.Empty:
                    continue
                while len(events) < MAX_EVENTS_PER_MESSAGE:  # whatever else is waiting goes too
                    try:
                        events.extend(subscriber.get_nowait())
                    except queue.Empty:
                        break
                yield worker_pb2.TokenEvents(events=events)
        finally:
            self.engine.results.unsubscribe(subscriber)


def _free_port() -> int:
    """A TCP port free now (the OS's choice); MLX's ring backend binds it when a ring forms."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _gpu_working_set_bytes() -> int:
    """Metal's recommended working-set size on macOS (MLX's limit for GPU-resident memory)."""
    try:
        if mx.metal.is_available():
            return int(mx.metal.device_info().get("max_recommended_working_set_size", 0))
    except (AttributeError, RuntimeError):
        pass
    return 0


def serve(
    host: str, port: int, node_secrets: auth.NodeSecrets, max_message_bytes: int
) -> tuple[grpc.Server, threading.Event]:
    """Start a worker server that answers only calls carrying the cluster's token (and, with
    TLS, a certificate of the cluster's CA); returns it and an event set when it should stop.
    The secrets also serve this node's own links to other nodes."""
    auth.install(node_secrets)
    stopped = threading.Event()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKER_THREADS),
        options=server_options(max_message_bytes),
        interceptors=[auth.TokenCheck(node_secrets.token)],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    service = WorkerService(stopped.set, max_message_bytes)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    bound = auth.add_port(server, f"{host}:{port}", node_secrets)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (is the port in use?)")
    server.start()
    return server, stopped
