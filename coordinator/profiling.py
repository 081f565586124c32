"""Measuring the cluster before placing: each node's compute profile and power, its usable memory,
and every ordered link (node -> node over the workers' own data-plane stack, coordinator -> node).

Nodes that share a machine (same hostname) are measured one after another, so that one's work
does not slow the other's measurement; different machines are measured at the same time. Link
pairs go in rounds of disjoint pairs (a round-robin schedule), so no node measures two links at
once. Every call is bounded; a node that cannot be profiled in time fails the bring-up with a
message naming it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from pomona.catalogue import machine as catalogue_machine
from pomona.config import ClusterConfig, NodeConfig
from pomona.errors import ConfigError, PomonaError
from pomona.modelinfo import ModelInfo
from pomona.power import estimated_profile
from pomona.profile_codec import compute_from_proto
from pomona.profiles import COORDINATOR, ClusterProfile, LinkProfile, NodeProfile, PowerProfile
from pomona.proto import worker_pb2
from pomona.simulate import catalogue_power

# A node that cannot profile in this long fails the bring-up (POMONA_PROFILE_TIMEOUT_S overrides).
PROFILE_TIMEOUT_S = float(os.environ.get("POMONA_PROFILE_TIMEOUT_S", 600))
PROFILE_BUDGET_S = 60.0
LINK_TIMEOUT_S = 20.0
SMALL_ROUNDS, LARGE_ROUNDS = 30, 4
LARGE_BYTES = 2 * 2**20  # a prefill chunk's hidden states are 1-4 MB
SHORT_CONTEXT, LONG_CONTEXT = 64, 1024
# Without a meter, a measured power or figures in cluster.yaml, the planner still needs numbers:
# a mid-size Mac's wall figures, labelled as the assumption they are.
ASSUMED_IDLE_W, ASSUMED_MAX_W = 7.0, 100.0


@dataclass(frozen=True)
class NodeMeasurement:
    profile: NodeProfile
    cached: bool
    elapsed_s: float
    power_note: str  # why power is estimated, when it is


def power_of(node: NodeConfig, reply: worker_pb2.ProfileReply | None) -> tuple[PowerProfile, str]:
    """Measured power where the node has a meter; else the estimate cluster.yaml allows."""
    note = reply.power_note if reply is not None else ""
    if reply is not None and reply.power_measured:
        return PowerProfile(reply.idle_w, reply.busy_w, f"measured ({reply.power_meter})"), ""
    if node.power is not None:
        basis = f"cluster.yaml power: idle {node.power.idle_w:g} W, max {node.power.max_w:g} W"
        return estimated_profile(node.power.idle_w, node.power.max_w, basis), note
    if node.machine:
        try:
            spec = catalogue_machine(node.machine)
        except ConfigError as error:
            raise ConfigError(f"node {node.name!r}: {error}") from None
        return catalogue_power(spec), note
    basis = (
        f"assumed idle {ASSUMED_IDLE_W:g} W, max {ASSUMED_MAX_W:g} W: set `power:` or `machine:` "
        "for this node in cluster.yaml"
    )
    return estimated_profile(ASSUMED_IDLE_W, ASSUMED_MAX_W, basis), note


def usable_memory(node: NodeConfig, info: worker_pb2.NodeInfo) -> int:
    if node.memory_gb is not None:
        return int(node.memory_gb * 2**30)
    available = info.memory_available_bytes
    if info.gpu_working_set_bytes:  # Metal keeps at most this much resident for MLX
        available = min(available, info.gpu_working_set_bytes)
    return available


async def _profile_node(
    node: NodeConfig, info: worker_pb2.NodeInfo, stub, model: ModelInfo, chunk_tokens: int
) -> NodeMeasurement:
    request = worker_pb2.ProfileRequest(
        model_path=str(model.path),
        prefill_chunk_tokens=chunk_tokens,
        short_context=SHORT_CONTEXT,
        long_context=min(LONG_CONTEXT, model.context_length),
        time_budget_s=PROFILE_BUDGET_S,
    )
    try:
        reply = await stub.Profile(request, timeout=PROFILE_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            detail = f"it did not finish within {PROFILE_TIMEOUT_S:.0f} s"
        else:
            detail = error.details() or str(error.code())
        raise PomonaError(
            f"node {node.name!r} could not be profiled: {detail}. Check its log in .pomona/logs, "
            "or place the model by hand with placement.stages"
        ) from None
    power, note = power_of(node, reply)
    profile = NodeProfile(
        name=node.name,
        memory_bytes=usable_memory(node, info),
        compute=compute_from_proto(reply.compute),
        power=power,
        machine=node.machine or "",
        kv_bytes_per_token=model.kv_bytes_per_token * model.num_layers,
    )
    return NodeMeasurement(profile, reply.cached, reply.elapsed_s, note)


def _by_machine(nodes: Sequence[str], host_of: Callable[[str], str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for name in nodes:
        groups.setdefault(host_of(name), []).append(name)
    return list(groups.values())


async def profile_nodes(
    config: ClusterConfig,
    model: ModelInfo,
    infos: dict[str, worker_pb2.NodeInfo],
    stubs: dict,
    on_done: Callable[[str, NodeMeasurement], None] = lambda name, m: None,
) -> dict[str, NodeMeasurement]:
    """Every node's compute profile, power and memory."""
    results: dict[str, NodeMeasurement] = {}

    async def one_machine(names: list[str]) -> None:
        for name in names:  # nodes on one machine one after another: honest timings
            results[name] = await _profile_node(
                config.node(name),
                infos[name],
                stubs[name],
                model,
                config.generation.prefill_chunk_tokens,
            )
            on_done(name, results[name])

    groups = _by_machine([n.name for n in config.nodes], lambda n: infos[n].hostname)
    await asyncio.gather(*(one_machine(group) for group in groups))
    return results


def round_robin(names: Sequence[str]) -> list[list[tuple[str, str]]]:
    """Rounds of disjoint unordered pairs covering every pair once (the circle method)."""
    players = list(names) + ([None] if len(names) % 2 else [])
    rounds = []
    for _ in range(len(players) - 1):
        half = len(players) // 2
        pairs = [(players[i], players[-1 - i]) for i in range(half)]
        rounds.append([(a, b) for a, b in pairs if a is not None and b is not None])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def _link(source: str, message: worker_pb2.LinkMeasurement) -> LinkProfile:
    return LinkProfile(
        source,
        message.target,
        message.rtt_median_s / 2,
        message.rtt_p90_s / 2,
        message.bandwidth_bytes_per_s,
    )


async def measure_links(
    config: ClusterConfig,
    model: ModelInfo,
    infos: dict[str, worker_pb2.NodeInfo],
    stubs: dict,
) -> dict[tuple[str, str], LinkProfile]:
    """Every ordered node pair, measured by the source worker toward the target."""
    small = max(model.hidden_size, 64) * 4
    links: dict[tuple[str, str], LinkProfile] = {}

    async def measure(source: str, target: str) -> None:
        request = worker_pb2.MeasureLinksRequest(
            targets=[worker_pb2.LinkTarget(name=target, address=config.node(target).address)],
            small_bytes=small,
            large_bytes=LARGE_BYTES,
            small_rounds=SMALL_ROUNDS,
            large_rounds=LARGE_ROUNDS,
            timeout_s=LINK_TIMEOUT_S,
        )
        try:
            reply = await stubs[source].MeasureLinks(request, timeout=LINK_TIMEOUT_S + 10)
        except grpc.aio.AioRpcError as error:
            raise PomonaError(
                f"node {source!r} could not measure its link to {target!r}: {error.details()}"
            ) from None
        result = reply.links[0]
        if result.error:
            raise PomonaError(
                f"node {source!r} cannot reach node {target!r} at {config.node(target).address} "
                f"({result.error}); the nodes must reach each other on their worker ports"
            )
        links[(source, target)] = _link(source, result)

    names = [n.name for n in config.nodes]
    shared_machine = len({infos[n].hostname for n in names}) < len(names)
    for pairs in round_robin(names):
        for direction in (0, 1):
            jobs = [measure(*(pair if direction == 0 else pair[::-1])) for pair in pairs]
            if shared_machine:
                for job in jobs:
                    await job
            else:
                await asyncio.gather(*jobs)
    return links


async def measure_coordinator_links(
    config: ClusterConfig, stubs: dict, small_bytes: int = 64, rounds: int = 20
) -> dict[tuple[str, str], LinkProfile]:
    """Coordinator -> node: the prompt's hop (token ids) and the results' way back."""
    links = {}
    for node in config.nodes:
        call = stubs[node.name].Ping(timeout=LINK_TIMEOUT_S)
        rtts = []
        try:
            for index in range(rounds + 3):
                start = time.perf_counter()
                await call.write(worker_pb2.PingMessage(payload=bytes(small_bytes)))
                await call.read()
                if index >= 3:
                    rtts.append(time.perf_counter() - start)
            await call.done_writing()
        except grpc.aio.AioRpcError as error:
            raise PomonaError(
                f"the coordinator could not measure its link to node {node.name!r}: {error.details()}"
            ) from None
        finally:
            call.cancel()
        rtts.sort()
        median, p90 = statistics.median(rtts), rtts[int(0.9 * (len(rtts) - 1))]
        links[(COORDINATOR, node.name)] = LinkProfile(
            COORDINATOR, node.name, median / 2, p90 / 2, float("inf")
        )
    return links


async def profile_cluster(
    config: ClusterConfig,
    model: ModelInfo,
    infos: dict[str, worker_pb2.NodeInfo],
    stubs: dict,
    on_node: Callable[[str, NodeMeasurement], None] = lambda name, m: None,
) -> tuple[ClusterProfile, dict[str, NodeMeasurement]]:
    measurements = await profile_nodes(config, model, infos, stubs, on_node)
    links = await measure_links(config, model, infos, stubs)
    links.update(await measure_coordinator_links(config, stubs))
    nodes = tuple(measurements[n.name].profile for n in config.nodes)
    return ClusterProfile(nodes, links), measurements
