"""Recovering from a lost node: re-plan on the nodes that answer, reload, replay what was in flight.

When a serving node dies (its streams close, or its heartbeats stop), the coordinator:
1. holds every request in flight (their streams stay open; new requests are refused, clearly);
2. plans again on the nodes that still answer plus the cluster's `spare: true` nodes, with the same
   objective and measured profiles (explicit `placement.stages` no longer apply: the node is gone);
3. loads the new placement on every node in it (a node that no longer serves is released);
4. replays each held request from its prompt plus the tokens it had produced, so every stage
   rebuilds its cache, and the request continues where it stopped: greedy output is unchanged and
   seeded sampling too, because a token's randomness depends only on the seed and its position
   (`worker.sampling`).
If the remaining nodes cannot hold the model, or a reload fails, every held request fails with one
message naming the lost node and why, and the cluster is `degraded`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from pomona.config import OBJECTIVES
from pomona.errors import PomonaError
from pomona.planner import plan
from pomona.proto import worker_pb2

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 2.0  # a node that does not answer Status in this long is not used


async def recover(cluster: Cluster, lost: str) -> None:
    """Bring the cluster back without `lost` (see the module docstring); never raises."""
    router = cluster.router
    cluster.state = "recovering"
    cluster.message = f"node {lost!r} was lost; planning again on the others"
    log.warning("%s (%s)", cluster.message, cluster._lost.get(lost, ""))
    router.interrupt_all(f"recovering from the loss of node {lost!r}")
    try:
        candidates = [
            name for name, node in cluster.nodes.items() if name not in cluster._lost and node.stub
        ]
        answers = await asyncio.gather(
            *(cluster.worker_counters(name, ANSWER_TIMEOUT_S) for name in candidates)
        )
        alive = [name for name, answer in zip(candidates, answers) if answer is not None]
        old = cluster.plan
        settings = cluster.config.scheduler
        # An explicit placement no longer holds: the planner places, for the configured objective.
        objective = old.objective if old.objective in OBJECTIVES else settings.objective
        try:
            new_plan = plan(
                cluster.model, cluster.profile.subset(alive), old.workload, objective, settings.slack,
                cluster.kv_tokens,
            )
        except PomonaError as error:
            names = ", ".join(alive) or "none"
            raise PomonaError(f"the remaining nodes ({names}) cannot serve: {error}") from None
        previous = set(cluster.placement.nodes)
        cluster.plan, cluster.placement = new_plan, new_plan.chosen.placement
        cluster.message = f"node {lost!r} was lost; loading the new placement"
        serving = set(cluster.placement.nodes)
        # Every node that held a shard frees it (a worker loads only when it holds none).
        await asyncio.gather(*(
            cluster.nodes[name].stub.Release(worker_pb2.ReleaseRequest(), timeout=30)
            for name in previous - {lost} if name in alive
        ))
        await asyncio.gather(*(cluster._load(name) for name in cluster.placement.nodes))
        await cluster._subscribe([name for name in serving if name not in cluster._results])
        cluster.reopen_first_stage()
        cluster.retire(lost)
        cluster.watch_heartbeats()
        cluster.state, cluster.error = "ready", ""
        cluster.message = f"recovered from the loss of node {lost!r}"
        log.warning("%s: now %s", cluster.message, " ".join(
            f"{s.node}[{s.layers.start},{s.layers.end})" for s in cluster.placement.stages
        ))
        router.resume()
    except (PomonaError, grpc.aio.AioRpcError, TimeoutError) as error:
        reason = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
        cluster.state = "degraded"
        cluster.error = (
            f"node {lost!r} was lost and recovery failed: {reason}; requests are refused "
            "(`pomona down`, then `pomona up` with enough nodes)"
        )
        log.error(cluster.error)
        router.fail_all(cluster.error)
