"""The planner: which nodes serve, in which ring order, with which contiguous layer ranges and where
the experts go, chosen by the cost model (`pomona.costmodel`) for an objective. Pure: profiles in,
a `Plan` out.

Objectives (`placement.objective`, `--objective`):
- `latency`: least decode seconds per token for one stream.
- `throughput`: most aggregate tokens per second at the workload's concurrency.
- `energy`: least joules per token.
- `balanced` (default): least joules per token among plans whose latency is within
  (1 + slack) x the best latency.

How (documented, since exactness depends on it):
- A *sequence* is an ordered choice of nodes (the ring order; nodes not in it are left out). For a
  sequence, the best contiguous split is an exact dynamic program over split points, vectorised
  with numpy: stage m ending at layer j costs min over i of (stage m-1 ending at i) + hop + the
  node's compute for layers [i, j); splits that do not fit a node's memory (weights + KV budget)
  are excluded. Latency is additive per sequence; so is energy for one stream once the sequence
  fixes the serving set S (J/token = sum over stages of (idle power of S + node's extra busy
  power) x compute + idle power of S x hops).
- Up to `EXACT_NODES` nodes every sequence is tried: `latency` and `energy` (one stream) are then
  exact optima. `balanced` minimises energy + lambda x latency, bisecting lambda per sequence for
  the least energy within the latency bound (exact where the optimum lies on the convex hull of
  the (latency, energy) trade-off; near it otherwise). `throughput` with k > 1 streams bounds the
  busiest stage by thresholds and keeps the best (within the threshold grid's resolution).
- Beyond that, each node starts one greedy nearest-neighbour ring over the measured links and the
  DP also chooses which nodes of that ring to skip: O(nodes^3 x layers^2) numpy work.
- MoE models place whole layers with their experts first; when no sequence fits, stages hold
  layers without (some of) their routed experts, which go to the nodes with the cheapest links to
  the stage that have free memory (`pomona.experts.plan_experts`).

Baselines scored by the same cost model: `even` (every node, equal layer counts: mlx-lm),
`memory` (every node, layers in proportion to memory: exo), `compute` (the planner with every link
free: compute only, as prima.cpp).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from pomona.config import OBJECTIVES
from pomona.costmodel import TOKEN_ID_BYTES, Prediction, hidden_bytes_per_token, predict
from pomona.errors import PlacementError
from pomona.experts import plan_experts_for_stages
from pomona.modelinfo import ModelInfo
from pomona.placement import LayerRange, Placement, StagePlacement, assign_layers, check_fit
from pomona.profiles import ClusterProfile, Workload
from pomona.weight_bytes import format_bytes

EXACT_NODES = 6
INF = math.inf


@dataclass(frozen=True)
class PlanOption:
    """A placement and what the cost model predicts for it; `placement` None when infeasible."""

    name: str
    placement: Placement | None
    prediction: Prediction | None
    note: str = ""  # why infeasible, or how it was made


@dataclass(frozen=True)
class Plan:
    chosen: PlanOption
    objective: str
    workload: Workload
    left_out: dict[str, str] = field(default_factory=dict)  # node -> why it does not serve
    baselines: tuple[PlanOption, ...] = ()


@dataclass
class _Tables:
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


def _tables(
    model: ModelInfo,
    cluster: ClusterProfile,
    names: Sequence[str],
    workload: Workload,
    kv_tokens: int,
    without_experts: bool,
    free_links: bool = False,
) -> _Tables:
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
    return _Tables(
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


def _split(t: _Tables, seq: Sequence[int], weights: _Weights, stage_cap_s: float = INF):
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


def _placement(t: _Tables, seq: Sequence[int], ends: Sequence[int]) -> tuple[StagePlacement, ...]:
    stages, start = [], 0
    for m, (node, end) in enumerate(zip(seq, ends)):
        stages.append(StagePlacement(t.names[node], LayerRange(start, end), m == 0, m == len(seq) - 1))
        start = end
    return tuple(stages)


def _sequences(t: _Tables, cluster: ClusterProfile, model: ModelInfo):
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


def _weights_latency(t: _Tables) -> _Weights:
    return _Weights(np.ones(len(t.names)), 1.0)


def _weights_energy(t: _Tables, seq: Sequence[int], lam: float = 0.0) -> _Weights:
    idle = float(t.idle_w[list(seq)].sum())
    return _Weights(idle + t.extra_w + lam, idle + lam)


class _Search:
    """Runs the DP for every candidate sequence and keeps what each objective needs."""

    def __init__(self, t: _Tables, cluster: ClusterProfile, model: ModelInfo):
        self.t = t
        self.sequences = list(_sequences(t, cluster, model))

    def latency(self):
        best = (INF, None, None)
        for seq in self.sequences:
            cost, ends = _split(self.t, seq, _weights_latency(self.t))
            if cost < best[0]:
                best = (cost, seq, ends)
        return best

    def energy(self):
        best = (INF, None, None)
        for seq in self.sequences:
            cost, ends = _split(self.t, seq, _weights_energy(self.t, seq))
            if cost < best[0]:
                best = (cost, seq, ends)
        return best

    def latency_of(self, seq, ends) -> float:
        t, start, total = self.t, 0, 0.0
        for m, (node, end) in enumerate(zip(seq, ends)):
            total += t.compute[node, start, end]
            total += t.embed_s[node] if m == 0 else t.hop_s[seq[m - 1], node]
            start = end
        if len(seq) > 1:
            total += t.back_s[seq[-1], seq[0]]
        return total + t.head_s[seq[-1]]

    def balanced(self, slack: float):
        best_latency, *_ = self.latency()
        bound = best_latency * (1 + slack) * (1 + 1e-9)
        best = (INF, None, None)
        for seq in self.sequences:
            fast, fast_ends = _split(self.t, seq, _weights_latency(self.t))
            if fast > bound:
                continue
            candidates = [(seq, fast_ends)]
            cost, ends = _split(self.t, seq, _weights_energy(self.t, seq))
            if ends is not None and self.latency_of(seq, ends) <= bound:
                candidates.append((seq, ends))
            else:  # bisect lambda: the least energy still within the bound
                low, high = 0.0, 1.0
                while True:
                    _, ends = _split(self.t, seq, _weights_energy(self.t, seq, high))
                    if ends is not None and self.latency_of(seq, ends) <= bound or high > 1e9:
                        break
                    high *= 4
                for _ in range(20):
                    mid = (low + high) / 2
                    _, ends = _split(self.t, seq, _weights_energy(self.t, seq, mid))
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
        t, start, total = self.t, 0, 0.0
        idle = float(t.idle_w[list(seq)].sum())
        total = idle * self.latency_of(seq, ends)
        for m, (node, end) in enumerate(zip(seq, ends)):
            busy = t.compute[node, start, end] + (t.embed_s[node] if m == 0 else 0.0)
            busy += t.head_s[node] if m == len(seq) - 1 else 0.0
            total += t.extra_w[node] * busy
            start = end
        return total

    def throughput(self, concurrency: int):
        latency, seq, ends = self.latency()
        if seq is None or concurrency <= 1:
            return latency, seq, ends
        best = (-self._rate(seq, ends, concurrency), seq, ends)
        for s in self.sequences:
            _, e = _split(self.t, s, _weights_latency(self.t))
            if e is None:
                continue
            cap = self._bottleneck(s, e)
            for _ in range(16):
                cap *= 0.9
                _, e2 = _split(self.t, s, _weights_latency(self.t), stage_cap_s=cap)
                if e2 is None:
                    break
                rate = self._rate(s, e2, concurrency)
                if -rate < best[0]:
                    best = (-rate, s, e2)
        return best

    def _bottleneck(self, seq, ends) -> float:
        t, start, worst = self.t, 0, 0.0
        for m, (node, end) in enumerate(zip(seq, ends)):
            stage = t.compute[node, start, end] + (t.embed_s[node] if m == 0 else 0.0)
            stage += t.head_s[node] if m == len(seq) - 1 else 0.0
            worst = max(worst, stage)
            start = end
        return worst

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


def _pareto_split(
    t: _Tables, seq: Sequence[int], track_bottleneck: bool = True
) -> list[tuple[float, float, float, list[int]]]:
    """Every Pareto-optimal split of `seq` in (latency T, busiest stage B, extra busy energy D).

    Each objective is non-decreasing in all three (latency: T; throughput: T and B; energy:
    idle(S) x max(T / k, B) + D), so its optimum over this sequence is one of these labels: an
    exact search, affordable for small instances (see `_SMALL_WORK`). With one stream B never
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
                        (lat + hop + stage, max(worst, stage), energy + extra[node] * stage, path + [j])
                    )
            if labels:
                new_states[j] = _pareto_prune(labels)
        states = new_states
    back = t.back_s[seq[-1], first]
    return [(lat + back, worst, energy, path) for lat, worst, energy, path in states.get(big_l, [])]


_SMALL_WORK = 6e4  # sequences x stages x layers^2: below this, search every Pareto split (~1 s)


class _ExactSearch:
    """Small instances: every sequence's whole Pareto set, each objective picked exactly."""

    def __init__(self, search: _Search, concurrency: int):
        self.t = search.t
        self.labels = []  # (T, B, D, idle of S, seq, ends)
        for seq in search.sequences:
            idle = float(self.t.idle_w[list(seq)].sum())
            for lat, worst, energy, ends in _pareto_split(self.t, seq, concurrency > 1):
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


# -- the public entry points ---------------------------------------------------------------------


def _option(
    name: str,
    model: ModelInfo,
    cluster: ClusterProfile,
    workload: Workload,
    stages: tuple[StagePlacement, ...],
    note: str = "",
) -> PlanOption:
    """Score stages with the full cost model, experts spread by cheapest link if they must be."""
    capacities = {node.name: node.memory_bytes for node in cluster.nodes}

    def link_cost(a: str, b: str) -> float:
        return cluster.link(a, b).latency_s

    try:
        experts = plan_experts_for_stages(model, stages, capacities, link_cost)
        placement = Placement(stages, experts)
        check_fit(model, placement, capacities)
    except PlacementError as error:
        return PlanOption(name, None, None, f"does not fit: {error}")
    return PlanOption(name, placement, predict(model, placement, cluster, workload), note)


def _search_best(search: _Search, objective: str, slack: float, workload: Workload):
    t = search.t
    work = sum(len(seq) for seq in search.sequences) * t.num_layers**2
    if work <= _SMALL_WORK:
        return _ExactSearch(search, workload.concurrency).best(objective, slack, workload.concurrency)
    if objective == "latency":
        return search.latency()
    if objective == "energy":
        return search.energy() if workload.concurrency <= 1 else search.balanced(1e9)
    if objective == "balanced":
        return search.balanced(slack)
    return search.throughput(workload.concurrency)


def plan(
    model: ModelInfo,
    cluster: ClusterProfile,
    workload: Workload,
    objective: str = "balanced",
    slack: float = 0.1,
    kv_tokens: int = 0,
) -> Plan:
    """The best placement of `model` on `cluster` for `objective`, with the three baselines.

    kv_tokens: context tokens each node must keep room for per layer (max context x streams).
    Raises PlacementError when no subset of the nodes can hold the model.
    """
    if objective not in OBJECTIVES:
        raise PlacementError(f"unknown placement objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if slack < 0:
        raise PlacementError(f"placement.slack must be >= 0 (got {slack}); 0.1 allows 10% slower")
    names = list(cluster.names)
    if not names:
        raise PlacementError("there are no nodes to place the model on; add nodes to cluster.yaml")
    kv_total = model.kv_bytes_per_token * kv_tokens * model.num_layers
    if sum(node.memory_bytes for node in cluster.nodes) < model.total_bytes + kv_total:
        raise _no_fit(model, cluster, kv_tokens)
    note = ""
    tables = _tables(model, cluster, names, workload, kv_tokens, without_experts=False)
    search = _Search(tables, cluster, model)
    _, seq, ends = _search_best(search, objective, slack, workload)
    if seq is None and model.is_moe:
        # No stage can hold its layers' experts: stages keep attention and routers, experts spill.
        tables = _tables(model, cluster, names, workload, kv_tokens, without_experts=True)
        search = _Search(tables, cluster, model)
        _, seq, ends = _search_best(search, objective, slack, workload)
        note = "experts moved off stage nodes that cannot hold them"
    if seq is None:
        raise _no_fit(model, cluster, kv_tokens)
    chosen = _option(objective, model, cluster, workload, _placement(tables, seq, ends), note)
    if chosen.placement is None:
        raise PlacementError(chosen.note.removeprefix("does not fit: "))
    used = set(chosen.placement.nodes)
    left_out = {
        n: _why_left_out(n, model, cluster, tables, used, objective, kv_tokens)
        for n in names
        if n not in used
    }
    return Plan(chosen, objective, workload, left_out, baselines(model, cluster, workload, kv_tokens))


def baselines(
    model: ModelInfo, cluster: ClusterProfile, workload: Workload, kv_tokens: int = 0
) -> tuple[PlanOption, ...]:
    """even (mlx-lm), memory-proportional (exo), compute-only ignoring the network (prima.cpp)."""
    names = list(cluster.names)
    options = []
    count, layers = len(names), model.num_layers
    if count > layers:
        options.append(PlanOption("even", None, None, f"{count} nodes but only {layers} layers"))
        options.append(PlanOption("memory", None, None, f"{count} nodes but only {layers} layers"))
    else:
        base, extra = divmod(layers, count)
        sizes = [base + (1 if i < extra else 0) for i in range(count)]
        options.append(_option("even", model, cluster, workload, _stages(names, sizes), "equal layer counts"))
        capacities = [cluster.node(n).memory_bytes for n in names]
        ranges = assign_layers(model.layer_bytes, model.embed_bytes, model.head_bytes, capacities)
        options.append(
            _option(
                "memory",
                model,
                cluster,
                workload,
                _stages(names, [len(r) for r in ranges]),
                "layers in proportion to memory",
            )
        )
    free = _tables(model, cluster, names, workload, kv_tokens, without_experts=False, free_links=True)
    _, seq, ends = _Search(free, cluster, model).latency()
    if seq is None:
        options.append(PlanOption("compute", None, None, "no split fits with whole layers"))
    else:
        options.append(
            _option(
                "compute",
                model,
                cluster,
                workload,
                _placement(free, seq, ends),
                "least compute, links ignored",
            )
        )
    return tuple(options)


def _stages(names: Sequence[str], sizes: Sequence[int]) -> tuple[StagePlacement, ...]:
    stages, start = [], 0
    for index, (name, size) in enumerate(zip(names, sizes)):
        stages.append(
            StagePlacement(name, LayerRange(start, start + size), index == 0, index == len(names) - 1)
        )
        start += size
    return tuple(stages)


def _no_fit(model: ModelInfo, cluster: ClusterProfile, kv_tokens: int) -> PlacementError:
    total = sum(node.memory_bytes for node in cluster.nodes)
    kv = model.kv_bytes_per_token * kv_tokens * model.num_layers
    listing = ", ".join(f"{n.name} {format_bytes(n.memory_bytes)}" for n in cluster.nodes)
    return PlacementError(
        f"the model does not fit any subset of the nodes: its weights are "
        f"{format_bytes(model.total_bytes)}"
        + (f" plus {format_bytes(kv)} of KV cache budget" if kv else "")
        + f", and the nodes have {format_bytes(total)} together ({listing}). Add nodes, lower "
        "generation.max_context, or use a smaller or more quantized model."
    )


def _why_left_out(
    node: str,
    model: ModelInfo,
    cluster: ClusterProfile,
    t: _Tables,
    used: set[str],
    objective: str,
    kv_tokens: int,
) -> str:
    n = t.names.index(node)
    if not t.fits_mid[n].any() and not t.fits_first[n].any() and not t.fits_last[n].any():
        return f"its memory ({format_bytes(cluster.node(node).memory_bytes)}) cannot hold one layer"
    per_layer = t.compute[n, 0, t.num_layers] / t.num_layers
    fastest = min(t.compute[t.names.index(u), 0, t.num_layers] / t.num_layers for u in used)
    hops = [cluster.link(u, node).latency_s for u in used] + [cluster.link(node, u).latency_s for u in used]
    power = cluster.node(node).power
    return (
        f"the {objective} objective is better without it: it computes a layer in "
        f"{per_layer * 1e3:.2f} ms (fastest serving node {fastest * 1e3:.2f} ms), its cheapest link "
        f"to a serving node is {min(hops) * 1e3:.2f} ms one-way, it idles at {power.idle_w:.0f} W "
        f"({power.basis})"
    )


def replace_workload(plan_: Plan, workload: Workload) -> Plan:
    return replace(plan_, workload=workload)
