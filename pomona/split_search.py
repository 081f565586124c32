"""The search behind the planner: for candidate ring orders of nodes, the best contiguous split
of the layers under each objective. Pure numpy over the profiles; `pomona.planner` drives it and
documents how exact each search is.

A *sequence* is an ordered choice of nodes (the ring order). `best_split` is an exact dynamic
program over split points for one sequence and one scalarised cost; `Search` runs it over every
candidate sequence (all ordered subsets up to `EXACT_NODES` nodes, greedy rings beyond) with
Lagrangian and threshold searches for the objectives that are not additive; `ExactSearch` keeps
every Pareto-optimal split in (latency, busiest stage, busy energy) on small instances.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pomona.costmodel import TOKEN_ID_BYTES, hidden_bytes_per_token
from pomona.modelinfo import ModelInfo
from pomona.placement import LayerRange, StagePlacement
from pomona.profiles import ClusterProfile, Workload

EXACT_NODES = 6
INF = math.inf


@dataclass
class Tables:
    """Per-node arrays the DP reads: prefix sums of decode seconds, memory feasibility."""

    names: list[str]
    num_layers: int
    compute: np.ndarray  # [N, L+1, L+1]: decode seconds of layers [i, j) on node n (inf if i >= j)
    fits_mid: np.ndarray  # [N, L+1, L+1] bool: a middle stage [i, j) fits node n
    fits_first: np.ndarray  # [N, L+1] bool: a first stage [0, j) fits
    fits_last: np.ndarray  # [N, L+1] bool: a last stage [i, L) fits
    fits_whole: np.ndarray  # [N] bool: one stage holding everything fits
    embed_s: np.ndarray  # [N]
    head_s: np.ndarray  # [N]
    hop_s: np.ndarray  # [N, N] one-way hop of one token's hidden state
    back_s: np.ndarray  # [N, N] one-way hop of a token id (last stage -> first)
    idle_w: np.ndarray
    extra_w: np.ndarray  # busy - idle


def build_tables(
    model: ModelInfo,
    cluster: ClusterProfile,
    names: Sequence[str],
    workload: Workload,
    kv_tokens: int,
    without_experts: bool,
    free_links: bool = False,
) -> Tables:
    n_layers = model.num_layers
    size = hidden_bytes_per_token(model)
    layer_bytes = np.array(
        [model.non_expert_bytes(i) if without_experts else model.layer_bytes[i] for i in range(n_layers)],
        dtype=np.float64,
    )
    layer_bytes += model.kv_bytes_per_token * kv_tokens
    prefix_bytes = np.concatenate([[0.0], np.cumsum(layer_bytes)])
    span_bytes = prefix_bytes[None, :] - prefix_bytes[:, None]  # [i, j] bytes of layers [i, j)
    upper = np.triu(np.ones((n_layers + 1, n_layers + 1), dtype=bool), k=1)
    embed, head = float(model.embed_bytes), float(model.head_bytes)
    both = embed + head - (embed if model.tied_embeddings else 0.0)
    count = len(names)
    compute = np.full((count, n_layers + 1, n_layers + 1), INF)
    fits_mid = np.zeros((count, n_layers + 1, n_layers + 1), dtype=bool)
    fits_first = np.zeros((count, n_layers + 1), dtype=bool)
    fits_last = np.zeros((count, n_layers + 1), dtype=bool)
    fits_whole = np.zeros(count, dtype=bool)
    context = workload.mean_decode_context
    for n, name in enumerate(names):
        node = cluster.node(name)
        seconds = [node.compute.decode_at(i, context) for i in range(n_layers)]
        prefix = np.concatenate([[0.0], np.cumsum(seconds)])
        compute[n] = np.where(upper, prefix[None, :] - prefix[:, None], INF)
        capacity = node.memory_bytes
        fits_mid[n] = upper & (span_bytes <= capacity)
        fits_first[n] = upper[0] & (span_bytes[0] + embed <= capacity)
        fits_last[n] = upper[:, n_layers] & (span_bytes[:, n_layers] + head <= capacity)
        fits_whole[n] = span_bytes[0, n_layers] + both <= capacity
    hop = np.zeros((count, count))
    back = np.zeros((count, count))
    if not free_links:
        for a, b in itertools.permutations(range(count), 2):
            hop[a, b] = cluster.link(names[a], names[b]).transfer_s(size)
            back[a, b] = cluster.link(names[a], names[b]).transfer_s(TOKEN_ID_BYTES)
    powers = [cluster.node(name).power for name in names]
    return Tables(
        list(names),
        n_layers,
        compute,
        fits_mid,
        fits_first,
        fits_last,
        fits_whole,
        np.array([cluster.node(x).compute.embed_s for x in names]),
        np.array([cluster.node(x).compute.head_s for x in names]),
        hop,
        back,
        np.array([p.idle_w for p in powers]),
        np.array([p.busy_w - p.idle_w for p in powers]),
    )


@dataclass(frozen=True)
class _Weights:
    """Scalarised cost: compute seconds on node n cost `compute[n]`, hop seconds cost `hop`."""

    compute: np.ndarray
    hop: float


def best_split(t: Tables, seq: Sequence[int], weights: _Weights, stage_cap_s: float = INF):
    """Exact best split of all layers over the nodes of `seq` in order (each >= 1 layer).

    Returns (cost, ends) with ends[m] the end layer of stage m, or (inf, None) when nothing fits.
    """
    big_l, k = t.num_layers, len(seq)
    if k > big_l:
        return INF, None
    first = seq[0]
    if k == 1:
        if not t.fits_whole[first] or t.compute[first, 0, big_l] > stage_cap_s:
            return INF, None
        cost = weights.compute[first] * (t.compute[first, 0, big_l] + t.embed_s[first] + t.head_s[first])
        return float(cost), [big_l]
    row = t.compute[first, 0] + t.embed_s[first]
    ok = t.fits_first[first] & (row <= stage_cap_s)
    f = np.where(ok, weights.compute[first] * row, INF)
    f[big_l - (k - 1) + 1 :] = INF  # every later stage needs a layer
    choices = []
    for m in range(1, k):
        node, prev = seq[m], seq[m - 1]
        hop = weights.hop * t.hop_s[prev, node]
        if m < k - 1:
            seconds = t.compute[node]
            ok = t.fits_mid[node] & (seconds <= stage_cap_s)
            total = np.where(ok, f[:, None] + hop + weights.compute[node] * seconds, INF)
            best = np.argmin(total, axis=0)
            f = total[best, np.arange(big_l + 1)]
            f[big_l - (k - 1 - m) + 1 :] = INF
            choices.append(best)
        else:
            seconds = t.compute[node, :, big_l] + t.head_s[node]
            ok = t.fits_last[node] & (seconds <= stage_cap_s)
            total = np.where(ok, f + hop + weights.compute[node] * seconds, INF)
            start = int(np.argmin(total))
            cost = total[start] + weights.hop * t.back_s[node, first]
            if not math.isfinite(cost):
                return INF, None
            ends, end = [big_l], start
            for best in reversed(choices):  # choices[m - 1]: stage m's start for each end
                ends.append(end)
                end = int(best[end])
            ends.append(end)
            ends.reverse()
            return float(cost), ends
    raise AssertionError("unreachable")


def stage_placements(names: Sequence[str], ends: Sequence[int]) -> tuple[StagePlacement, ...]:
    """Stages in ring order: node `names[m]` runs layers [ends[m - 1], ends[m])."""
    stages, start = [], 0
    for m, (name, end) in enumerate(zip(names, ends)):
        stages.append(StagePlacement(name, LayerRange(start, end), m == 0, m == len(names) - 1))
        start = end
    return tuple(stages)


def stages_of(t: Tables, seq: Sequence[int], ends: Sequence[int]) -> tuple[StagePlacement, ...]:
    return stage_placements([t.names[node] for node in seq], ends)


def _sequences(t: Tables, cluster: ClusterProfile, model: ModelInfo):
    """Every ordered choice of nodes (small clusters); for large ones, the fastest m nodes for a
    few sizes m (grown by memory until they can hold the model), each ring built greedily from
    every start along the cheapest measured hops."""
    count = len(t.names)
    capacity = np.array([cluster.node(n).memory_bytes for n in t.names], dtype=np.float64)
    need = float(sum(model.non_expert_bytes(i) for i in range(model.num_layers)))
    if count <= EXACT_NODES:
        for k in range(1, min(count, t.num_layers) + 1):
            for seq in itertools.permutations(range(count), k):
                if capacity[list(seq)].sum() >= need:
                    yield seq
        return
    speed = [t.compute[n, 0, t.num_layers] for n in range(count)]
    by_speed = sorted(range(count), key=lambda n: speed[n])
    by_memory = sorted(range(count), key=lambda n: -capacity[n])
    sizes = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, count})
    seen = set()
    for m in sizes:
        if m > min(count, t.num_layers):
            continue
        chosen = by_speed[:m]
        for n in by_memory:
            if capacity[chosen].sum() >= need or len(chosen) >= t.num_layers:
                break
            if n not in chosen:
                chosen.append(n)
        if capacity[chosen].sum() < need:
            continue
        for start in chosen:
            ring, rest = [start], set(chosen) - {start}
            while rest:
                step = min(rest, key=lambda n: t.hop_s[ring[-1], n])
                ring.append(step)
                rest.discard(step)
            if tuple(ring) not in seen:
                seen.add(tuple(ring))
                yield tuple(ring)


def _weights_latency(t: Tables) -> _Weights:
    return _Weights(np.ones(len(t.names)), 1.0)


def _weights_energy(t: Tables, seq: Sequence[int], lam: float = 0.0) -> _Weights:
    idle = float(t.idle_w[list(seq)].sum())
    return _Weights(idle + t.extra_w + lam, idle + lam)


class Search:
    """Runs the DP for every candidate sequence and keeps what each objective needs."""

    def __init__(self, t: Tables, cluster: ClusterProfile, model: ModelInfo):
        self.t = t
        self.sequences = list(_sequences(t, cluster, model))

    def latency(self):
        best = (INF, None, None)
        for seq in self.sequences:
            cost, ends = best_split(self.t, seq, _weights_latency(self.t))
            if cost < best[0]:
                best = (cost, seq, ends)
        return best

    def energy(self):
        best = (INF, None, None)
        for seq in self.sequences:
            cost, ends = best_split(self.t, seq, _weights_energy(self.t, seq))
            if cost < best[0]:
                best = (cost, seq, ends)
        return best

    def _stage_seconds(self, seq, ends):
        """Each stage's (node, decode compute seconds incl. embedding first and head last)."""
        t, start = self.t, 0
        for m, (node, end) in enumerate(zip(seq, ends)):
            seconds = t.compute[node, start, end] + (t.embed_s[node] if m == 0 else 0.0)
            yield node, seconds + (t.head_s[node] if m == len(seq) - 1 else 0.0)
            start = end

    def latency_of(self, seq, ends) -> float:
        t = self.t
        hops = sum(t.hop_s[a, b] for a, b in zip(seq, seq[1:]))
        back = t.back_s[seq[-1], seq[0]] if len(seq) > 1 else 0.0
        return sum(s for _, s in self._stage_seconds(seq, ends)) + hops + back

    def balanced(self, slack: float):
        best_latency, *_ = self.latency()
        bound = best_latency * (1 + slack) * (1 + 1e-9)
        best = (INF, None, None)
        for seq in self.sequences:
            fast, fast_ends = best_split(self.t, seq, _weights_latency(self.t))
            if fast > bound:
                continue
            candidates = [(seq, fast_ends)]
            _, ends = best_split(self.t, seq, _weights_energy(self.t, seq))
            if ends is not None and self.latency_of(seq, ends) <= bound:
                candidates.append((seq, ends))
            else:  # bisect lambda: the least energy still within the bound
                low, high = 0.0, 1.0
                while True:
                    _, ends = best_split(self.t, seq, _weights_energy(self.t, seq, high))
                    if ends is not None and self.latency_of(seq, ends) <= bound or high > 1e9:
                        break
                    high *= 4
                for _ in range(20):
                    mid = (low + high) / 2
                    _, ends = best_split(self.t, seq, _weights_energy(self.t, seq, mid))
                    if ends is not None and self.latency_of(seq, ends) <= bound:
                        high = mid
                        candidates.append((seq, ends))
                    else:
                        low = mid
            for seq_, ends_ in candidates:
                ends_ = self._improve(seq_, list(ends_), bound)
                energy = self.energy_of(seq_, ends_)
                if energy < best[0]:
                    best = (energy, seq_, ends_)
        return best

    def _fits(self, seq, ends) -> bool:
        t, start = self.t, 0
        for m, (node, end) in enumerate(zip(seq, ends)):
            if end <= start:
                return False
            if len(seq) == 1:
                return bool(t.fits_whole[node])
            if m == 0:
                ok = t.fits_first[node, end]
            elif m == len(seq) - 1:
                ok = t.fits_last[node, start]
            else:
                ok = t.fits_mid[node, start, end]
            if not ok:
                return False
            start = end
        return True

    def _improve(self, seq, ends: list[int], bound: float) -> list[int]:
        """Shift stage boundaries one layer at a time while energy drops and latency stays within
        the bound: the Lagrangian search finds only corners of the trade-off, and with uniform
        layers the optimum at the bound lies between two corners."""
        energy = self.energy_of(seq, ends)
        improved = True
        while improved:
            improved = False
            for m in range(len(seq) - 1):
                for delta in (1, -1):
                    trial = list(ends)
                    trial[m] += delta
                    if not self._fits(seq, trial) or self.latency_of(seq, trial) > bound:
                        continue
                    trial_energy = self.energy_of(seq, trial)
                    if trial_energy < energy - 1e-12:
                        ends, energy, improved = trial, trial_energy, True
        return ends

    def energy_of(self, seq, ends) -> float:
        idle = float(self.t.idle_w[list(seq)].sum())
        busy = sum(self.t.extra_w[node] * s for node, s in self._stage_seconds(seq, ends))
        return idle * self.latency_of(seq, ends) + busy

    def throughput(self, concurrency: int):
        latency, seq, ends = self.latency()
        if seq is None or concurrency <= 1:
            return latency, seq, ends
        best = (-self._rate(seq, ends, concurrency), seq, ends)
        for s in self.sequences:
            _, e = best_split(self.t, s, _weights_latency(self.t))
            if e is None:
                continue
            cap = self._bottleneck(s, e)
            for _ in range(16):
                cap *= 0.9
                _, e2 = best_split(self.t, s, _weights_latency(self.t), stage_cap_s=cap)
                if e2 is None:
                    break
                rate = self._rate(s, e2, concurrency)
                if -rate < best[0]:
                    best = (-rate, s, e2)
        return best

    def _bottleneck(self, seq, ends) -> float:
        return max(s for _, s in self._stage_seconds(seq, ends))

    def _rate(self, seq, ends, concurrency: int) -> float:
        return min(concurrency / self.latency_of(seq, ends), 1.0 / self._bottleneck(seq, ends))


def _pareto_prune(labels: list[tuple]) -> list[tuple]:
    """Keep labels no other label is at most in every value of (values..., payload)."""
    labels.sort()
    if all(label[1] == 0.0 for label in labels):  # two values (T, D): one sweep
        kept, best = [], INF
        for label in labels:
            if label[2] < best:
                kept.append(label)
                best = label[2]
        return kept
    kept: list[tuple] = []
    for label in labels:
        values = label[:-1]
        if not any(all(a <= b for a, b in zip(other[:-1], values)) for other in kept):
            kept.append(label)
    return kept


def _pareto_splits(
    t: Tables, seq: Sequence[int], track_bottleneck: bool = True
) -> list[tuple[float, float, float, list[int]]]:
    """Every Pareto-optimal split of `seq` in (latency T, busiest stage B, extra busy energy D).

    Each objective is non-decreasing in all three (latency: T; throughput: T and B; energy:
    idle(S) x max(T / k, B) + D), so its optimum over this sequence is one of these labels: an
    exact search, affordable for small instances (see `SMALL_WORK`). With one stream B never
    matters (B <= T), so `track_bottleneck=False` keeps B at 0 and prunes in two values."""
    big_l, k, first = t.num_layers, len(seq), seq[0]
    compute, extra = t.compute, t.extra_w
    worst_of = max if track_bottleneck else (lambda a, b: 0.0)
    if k == 1:
        if not t.fits_whole[first]:
            return []
        stage = compute[first, 0, big_l] + t.embed_s[first] + t.head_s[first]
        return [(stage, worst_of(stage, 0.0), extra[first] * stage, [big_l])]
    # states[j]: labels (T, B, D, ends) of the stages so far ending at layer j
    states: dict[int, list] = {}
    for j in range(1, big_l - (k - 1) + 1):
        if t.fits_first[first, j]:
            stage = compute[first, 0, j] + t.embed_s[first]
            states[j] = [(stage, worst_of(stage, 0.0), extra[first] * stage, [j])]
    for m in range(1, k):
        node, prev, last = seq[m], seq[m - 1], m == k - 1
        hop = t.hop_s[prev, node]
        ends = [big_l] if last else range(m + 1, big_l - (k - 1 - m) + 1)
        new_states: dict[int, list] = {}
        for j in ends:
            labels = []
            for i, previous in states.items():
                if i >= j or not (t.fits_last[node, i] if last else t.fits_mid[node, i, j]):
                    continue
                stage = compute[node, i, j] + (t.head_s[node] if last else 0.0)
                for lat, worst, energy, path in previous:
                    labels.append(
                        (lat + hop + stage, worst_of(worst, stage), energy + extra[node] * stage, path + [j])
                    )
            if labels:
                new_states[j] = _pareto_prune(labels)
        states = new_states
    back = t.back_s[seq[-1], first]
    return [(lat + back, worst, energy, path) for lat, worst, energy, path in states.get(big_l, [])]


SMALL_WORK = 6e4  # sequences x stages x layers^2: below this, search every Pareto split (~1 s)


class ExactSearch:
    """Small instances: every sequence's whole Pareto set, each objective picked exactly."""

    def __init__(self, search: Search, concurrency: int):
        self.t = search.t
        self.labels = []  # (T, B, D, idle of S, seq, ends)
        for seq in search.sequences:
            idle = float(self.t.idle_w[list(seq)].sum())
            for lat, worst, energy, ends in _pareto_splits(self.t, seq, concurrency > 1):
                self.labels.append((lat, worst, energy, idle, seq, ends))

    def best(self, objective: str, slack: float, concurrency: int):
        if not self.labels:
            return INF, None, None

        def energy(label) -> float:
            lat, worst, extra, idle = label[:4]
            return idle * max(lat / concurrency, worst) + extra

        def rate(label) -> float:
            return min(concurrency / label[0], 1.0 / label[1] if label[1] > 0 else INF)

        if objective == "latency":
            key = lambda label: (label[0], energy(label))  # noqa: E731
        elif objective == "throughput":
            key = lambda label: (-rate(label), label[0])  # noqa: E731
        elif objective == "energy":
            key = lambda label: (energy(label), label[0])  # noqa: E731
        else:
            bound = min(label[0] for label in self.labels) * (1 + slack) * (1 + 1e-9)
            key = lambda label: (energy(label) if label[0] <= bound else INF, label[0])  # noqa: E731
        label = min(self.labels, key=key)
        return key(label)[0], label[4], label[5]
