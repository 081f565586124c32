"""Soak: many concurrent streams over HTTP for minutes, with cancellations and bad requests mixed in.

A Pomona cluster on loopback (a tiny random checkpoint, 2 stages by default) serves STREAMS
clients that loop until the time is up. Each round a client picks at random:
- a good streaming request (greedy `/v1/chat/completions`, random length), read to the end;
- a cancellation: a good streaming request dropped after a few tokens (the client disconnects);
- a bad request (unknown model, negative max_tokens, n=3, broken JSON, an empty message list), which
  must get a 4xx, never a 5xx, and never disturb the others.
Every 5 s the resident memory (RSS) of the coordinator and every worker is sampled. Printed at the
end: requests by kind and outcome (errors on good requests must be 0), inter-token latency p50 and
p99 of the good requests, and each process's RSS after warm-up (the first quarter of the run) and at
the end, with the growth (target: under 10%).

    .venv/bin/python bench/soak.py [--minutes 10] [--streams 32] [--stages 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster_helpers import cluster_pids, free_ports, running_cluster  # noqa: E402
from http_helpers import api_url  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

from pomona.modelinfo import describe_model  # noqa: E402

SAMPLE_EVERY_S = 5.0
BAD_BODIES = [
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
    {"messages": [{"role": "user", "content": "hi"}], "n": 3},
    {"messages": []},
    "{not json",
]


async def good(session, url, rng, gaps: list[float], cancel_after: int | None) -> str:
    body = {
        "messages": [{"role": "user", "content": f"Tell me about the number {rng.randrange(1000)}"}],
        "max_tokens": rng.randint(8, 48),
        "temperature": 0,
        "stream": True,
    }
    last, tokens = None, 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            return f"http {response.status}"
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if "error" in data:
                return "error event"
            if any((c.get("delta") or {}).get("content") for c in data.get("choices") or ()):
                now = time.perf_counter()
                if last is not None and cancel_after is None:
                    gaps.append(now - last)
                last, tokens = now, tokens + 1
                if cancel_after is not None and tokens >= cancel_after:
                    return "cancelled"  # leaving the block drops the connection
    return "ok" if tokens else "no tokens"


async def bad(session, url, rng) -> str:
    body = rng.choice(BAD_BODIES)
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(
        body, str
    ) else {"json": body}
    async with session.post(f"{url}/v1/chat/completions", **kwargs) as response:
        await response.read()
        return "4xx" if 400 <= response.status < 500 else f"http {response.status}"


async def client(index, url, deadline, seed, outcomes: Counter, gaps: list[float]) -> None:
    rng = random.Random(seed * 1000 + index)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            kind = rng.choices(["good", "cancel", "bad"], weights=[6, 2, 2])[0]
            try:
                if kind == "bad":
                    outcome = await bad(session, url, rng)
                else:
                    cancel_after = rng.randint(1, 4) if kind == "cancel" else None
                    outcome = await good(session, url, rng, gaps, cancel_after)
            except (aiohttp.ClientError, TimeoutError) as error:
                outcome = f"client error {type(error).__name__}"
            outcomes[(kind, outcome)] += 1


async def sample_rss(pids: dict[str, int], deadline: float, samples: list[tuple[float, dict]]) -> None:
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    started = time.monotonic()
    while time.monotonic() < deadline:
        rss = {}
        for name, process in processes.items():
            try:
                rss[name] = process.memory_info().rss
            except psutil.NoSuchProcess:
                rss[name] = 0
        samples.append((time.monotonic() - started, rss))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def soak(url: str, pids: dict[str, int], minutes: float, streams: int, seed: int):
    deadline = time.monotonic() + minutes * 60
    outcomes: Counter = Counter()
    gaps: list[float] = []
    samples: list[tuple[float, dict]] = []
    sampler = asyncio.create_task(sample_rss(pids, deadline, samples))
    await asyncio.gather(*(client(i, url, deadline, seed, outcomes, gaps) for i in range(streams)))
    await sampler
    return outcomes, gaps, samples


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered else 0.0


def report(outcomes: Counter, gaps: list[float], samples, minutes: float, streams: int) -> None:
    print(f"== soak: {streams} streams for {minutes:g} min ==")
    for (kind, outcome), count in sorted(outcomes.items()):
        print(f"  {kind:<7} {outcome:<28} {count:>6}")
    good_errors = sum(n for (kind, outcome), n in outcomes.items()
                      if kind == "good" and outcome != "ok")
    bad_wrong = sum(n for (kind, outcome), n in outcomes.items() if kind == "bad" and outcome != "4xx")
    print(f"  errors on good requests: {good_errors} (target 0); bad requests not answered 4xx: "
          f"{bad_wrong} (target 0)")
    print(f"  inter-token latency of good requests: p50 {percentile(gaps, 0.5) * 1e3:.1f} ms, "
          f"p99 {percentile(gaps, 0.99) * 1e3:.1f} ms ({len(gaps)} gaps)")
    warm = [rss for t, rss in samples if t >= minutes * 60 / 4]
    if len(warm) >= 2:
        print("  RSS after warm-up (first quarter) -> end, per process (target: growth under 10%):")
        first, last = warm[0], warm[-1]
        for name in first:
            growth = last[name] / first[name] - 1 if first[name] else 0.0
            print(f"    {name:<12} {first[name] / 2**20:>8.1f} MiB -> {last[name] / 2**20:>8.1f} MiB  "
                  f"{growth:>+6.1%}  (peak {max(r[name] for r in warm) / 2**20:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = make_tiny_checkpoint("llama", root / "llama", num_layers=4)
        layers = describe_model(checkpoint).num_layers
        step = layers // args.stages
        stages = [(i * step, layers if i == args.stages - 1 else (i + 1) * step) for i in range(args.stages)]
        api = {"host": "127.0.0.1", "port": free_ports(1)[0],
               "max_concurrent_requests": args.streams, "max_queue": args.streams * 2}
        with running_cluster(root / "cluster", checkpoint, args.stages, stages, api=api):
            directory = root / "cluster"
            state = json.loads((directory / ".pomona" / "cluster.json").read_text())
            pids = {"coordinator": state["pid"], **{n: w["pid"] for n, w in state["local_workers"].items()}}
            assert set(pids.values()) == set(cluster_pids(directory))
            outcomes, gaps, samples = asyncio.run(
                soak(api_url(directory), pids, args.minutes, args.streams, args.seed)
            )
    report(outcomes, gaps, samples, args.minutes, args.streams)


if __name__ == "__main__":
    main()
