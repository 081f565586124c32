"""Energy accounting: what the serving nodes drew over a span of time, measured or estimated.

A snapshot holds, per node, the time, the engine's cumulative busy seconds and, where the node has
a power meter, its cumulative joules. Between two snapshots a node used the meter's difference
(`measured (<meter>)`), or idle power for the whole span plus its extra busy power for the time it
computed (`estimated (<basis>)`, the cost model's formula on measured busy time). A request is
charged the cluster's energy over its lifetime times its share of the tokens produced meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pomona.profiles import PowerProfile
from pomona.proto import worker_pb2


@dataclass(frozen=True)
class NodeReading:
    at_s: float
    busy_s: float
    energy_j: float | None  # None: no meter on the node
    meter: str


@dataclass(frozen=True)
class Snapshot:
    readings: dict[str, NodeReading]
    tokens: int  # tokens the cluster had produced


@dataclass(frozen=True)
class NodeEnergy:
    node: str
    energy_j: float
    seconds: float
    basis: str

    @property
    def watts(self) -> float:
        return self.energy_j / self.seconds if self.seconds > 0 else 0.0


def combined_basis(bases: Sequence[str]) -> str:
    unique = sorted(set(bases))
    if len(unique) == 1:
        return unique[0]
    if all(b.startswith("measured") for b in unique):
        return "measured (" + ", ".join(b.removeprefix("measured (").rstrip(")") for b in unique) + ")"
    return "estimated (some nodes measured, others estimated: see `pomona status`)"


class EnergyAccount:
    def __init__(
        self,
        powers: dict[str, PowerProfile],
        status: Callable[[str], Awaitable[worker_pb2.WorkerStatus | None]],
        tokens: Callable[[], int],
    ):
        self.powers = powers  # the serving nodes
        self._status = status
        self._tokens = tokens
        self.origin: Snapshot | None = None

    async def snapshot(self) -> Snapshot:
        names = list(self.powers)
        replies = await asyncio.gather(*(self._status(name) for name in names))
        now = time.monotonic()
        readings = {}
        for name, reply in zip(names, replies):
            if reply is None:
                continue
            energy = reply.energy_j if reply.energy_measured else None
            readings[name] = NodeReading(now, reply.busy_s, energy, reply.power_meter)
        return Snapshot(readings, self._tokens())

    def between(self, start: Snapshot, end: Snapshot) -> list[NodeEnergy]:
        result = []
        for name, last in end.readings.items():
            first = start.readings.get(name)
            if first is None:
                continue
            seconds = last.at_s - first.at_s
            if last.energy_j is not None and first.energy_j is not None:
                joules, basis = last.energy_j - first.energy_j, f"measured ({last.meter})"
            else:
                power = self.powers[name]
                busy = min(max(last.busy_s - first.busy_s, 0.0), seconds)
                joules = power.idle_w * seconds + (power.busy_w - power.idle_w) * busy
                basis = power.basis if not power.measured else f"estimated (from {power.basis})"
            result.append(NodeEnergy(name, joules, seconds, basis))
        return result

    def request_energy(self, start: Snapshot, end: Snapshot, request_tokens: int) -> tuple[float, str]:
        """(joules, basis) charged to a request that produced `request_tokens` in the span."""
        nodes = self.between(start, end)
        if not nodes:
            return 0.0, "estimated (no node answered)"
        produced = max(end.tokens - start.tokens, request_tokens, 1)
        share = request_tokens / produced
        return sum(n.energy_j for n in nodes) * share, combined_basis([n.basis for n in nodes])
