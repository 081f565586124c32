"""Pipeline benchmark: single-process mlx-lm against 1-, 2- and 3-stage Pomona clusters on loopback,
in one run, on the real default model (SmolLM2-135M, compute-bound here) and on a tiny model whose
compute is small enough that transport shows.

Prints prefill and decode tok/s, ratios to single-process, the per-token transport overhead next to
N x (RTT / 2) for a ring of N stages (N one-way messages per token), with the round trip measured
in the same run on the data plane's own gRPC stack, threads and message size, and the throughput of two
concurrent requests on two stages. Rows "ring" run the same code with `transport: mlx-ring`
(stage-to-stage messages on an mx.distributed ring), against the ring's own round trip.

    .venv/bin/python bench/pipeline_bench.py [--new-tokens 32] [--models smollm2,tiny] [--compare TREE]

With --compare, the same setups also run on the Pomona code in TREE (e.g. `git worktree add
/tmp/before HEAD~3`), interleaved in the same rounds: before and after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_helpers import running_cluster  # noqa: E402
from ring_rtt import ring_round_trip_s  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

from pomona import auth  # noqa: E402
from pomona.fetch import fetch_default_model  # noqa: E402
from pomona.grpc_options import CHANNEL_OPTIONS  # noqa: E402
from pomona.proto import worker_pb2, worker_pb2_grpc  # noqa: E402
from pomona.tokenizer import load_tokenizer  # noqa: E402
from worker.gguf_loader import build_model, load_gguf  # noqa: E402
from worker.ring import FRAME_BYTES  # noqa: E402
from worker.wire import encode_tensor  # noqa: E402

PROMPT = (
    "Explain in a few sentences why splitting a language model across several computers "
    "can let it run when it does not fit in the memory of one of them, and what it costs."
)
# Best of this many runs per setup: this shared machine's timings vary by 10-20% run to run.
REPEATS = 5
# A second round trip is measured with this pause before each message: about a tiny-model
# stage's compute, the time a ring's stages wait (idle) between their messages.
PAUSE_S = 0.002
# The head is ~20% of SmolLM2's per-token compute (~7 layers' worth): the last stage gets fewer
# layers so that stages take about equal time.
LAYOUTS = {
    "smollm2": {1: [(0, 30)], 2: [(0, 19), (19, 30)], 3: [(0, 13), (13, 25), (25, 30)]},
    "tiny": {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]},
}


def single_process(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one request through mlx-lm's own generate_step."""
    started = time.perf_counter()
    steps = generate_step(mx.array(prompt_ids), model, sampler=lambda x: mx.argmax(x, -1))
    next(steps)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(steps)
    done = time.perf_counter()
    return len(prompt_ids) / (first - started), (new_tokens - 1) / (done - first)


def link_round_trip_s(
    address: str, payload_bytes: int, node_secrets, count: int = 300, pause_s: float = 0.0
) -> float:
    """Median round trip of one message on a persistent bidirectional gRPC stream, with the data
    plane's own client stack and threading: a sync channel with Pomona's options, messages handed
    to gRPC through a queue-fed iterator (as a link's sender does), replies read on a reader thread
    and handed back through a queue (as the engine receives them). The worker's Ping handler echoes
    on a server thread, as Forward and Experts run. With ``pause_s``, each message leaves that long
    after the last reply, as a stage's next message leaves after the other stages have computed
    (both ends idle meanwhile). A failure in the reader fails the run."""
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    failure: list[BaseException] = []
    with auth.channel(address, CHANNEL_OPTIONS, node_secrets) as channel:
        replies = worker_pb2_grpc.WorkerStub(channel).Ping(iter(outbox.get, None))

        def read() -> None:
            try:
                for reply in replies:
                    inbox.put(reply)
            except BaseException as error:  # noqa: BLE001 - reported to the measuring thread
                failure.append(error)
            inbox.put(None)

        reader = threading.Thread(target=read, name="rtt-reader", daemon=True)
        reader.start()
        message = worker_pb2.PingMessage(payload=b"x" * payload_bytes)
        times = []
        for _ in range(count):
            if pause_s:
                time.sleep(pause_s)
            sent = time.perf_counter()
            outbox.put(message)
            if inbox.get(timeout=10) is None:
                raise RuntimeError(f"the round-trip stream to {address} ended: {failure}")
            times.append(time.perf_counter() - sent)
        outbox.put(None)
        reader.join(timeout=10)
    if failure:
        raise RuntimeError(f"the round-trip stream to {address} failed: {failure[0]}")
    return statistics.median(times[20:])


def stage_message_bytes(model) -> int:
    """Bytes of one request's decode step as a stage sends it: a micro-batch of one row, the
    hidden state [1, 1, D] in the dtype the model's embedding produces."""
    hidden = model.model.embed_tokens(mx.array([[0]]))
    message = worker_pb2.StageMessage(
        request_id="batch-0",
        decode_step=worker_pb2.DecodeStep(
            batch=0, step=1, request_ids=["0" * 32], hidden=encode_tensor(hidden)
        ),
    )
    return message.ByteSize()


def run_threads(targets) -> None:
    """Run callables on threads at once; an exception in any of them fails the run."""
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
        if thread.is_alive():
            raise RuntimeError("a benchmark thread did not finish within 600 s")
    if errors:
        raise RuntimeError(f"a benchmark thread failed: {errors[0]!r}") from errors[0]


def stage_compute(cluster) -> dict[str, tuple[float, int]]:
    """Per stage: (compute seconds, one-row decode steps) so far, as its worker measured them."""
    return {s.node: (s.decode_busy_s, s.decode_steps) for s in cluster.status().stages}


def measured_run(cluster, prompt: str, raw: bool, new_tokens: int) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, stage compute s per token) of one request; the compute is
    the stages' own timing of this run's decode steps, summed over the stages."""
    before = stage_compute(cluster)
    prefill, decode, _ = cluster_run(cluster, prompt, raw, new_tokens)
    compute = 0.0
    for node, (busy_s, steps) in stage_compute(cluster).items():
        busy_before, steps_before = before.get(node, (0.0, 0))
        if steps > steps_before:
            compute += (busy_s - busy_before) / (steps - steps_before)
    return prefill, decode, compute


def cluster_run(cluster, prompt: str, raw: bool, new_tokens: int) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, wall s) of one request."""
    started = time.perf_counter()
    summary = cluster.generate(prompt, raw=raw, max_tokens=new_tokens, ignore_eos=True)
    wall = time.perf_counter() - started
    return summary.prompt_tokens / summary.ttft_s, summary.decode_tok_s, wall


def concurrent_ratio(cluster, prompt: str, raw: bool, new_tokens: int) -> float:
    """Throughput of two concurrent requests over one request's (tokens / wall time), each the
    best of REPEATS runs."""
    one = min(cluster_run(cluster, prompt, raw, new_tokens)[2] for _ in range(REPEATS))
    both = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        run_threads([lambda: cluster_run(cluster, prompt, raw, new_tokens)] * 2)
        both = min(both, time.perf_counter() - started)
    return (2 * new_tokens / both) / (new_tokens / one)


@contextlib.contextmanager
def code_from(tree: Path | None):
    """Clusters started inside run the Pomona code of ``tree`` (another checkout, e.g. the commit
    before a change), so that before and after are measured in the same run."""
    if tree is None:
        yield
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def start_clusters(stack, work: Path, name: str, path, layouts: dict, trees: dict) -> dict:
    """(code label, stage count) -> a running cluster, for each tree and layout; label "ring":
    this code with ``transport: mlx-ring`` (an mx.distributed ring between the stages)."""
    clusters = {}
    for label, tree in trees.items():
        for stages, layout in layouts.items():
            with code_from(tree):
                clusters[label, stages] = stack.enter_context(
                    running_cluster(work / f"{name}-{label}-{stages}", path, stages, layout)
                )
    for stages, layout in layouts.items():
        if stages > 1:
            clusters["ring", stages] = stack.enter_context(running_cluster(
                work / f"{name}-ring-{stages}", path, stages, layout, transport="mlx-ring"
            ))
    return clusters


def bench_model(
    name: str, path, model, raw: bool, prompt: str, new_tokens: int, work: Path, trees: dict
):
    tokenizer = load_tokenizer(Path(path) if path != "default" else fetch_default_model(True))
    prompt_ids = tokenizer.encode(prompt) if raw else tokenizer.encode_chat(
        [{"role": "user", "content": prompt}]
    )
    with contextlib.ExitStack() as stack:
        clusters = start_clusters(stack, work, name, path, LAYOUTS[name], trees)
        message_bytes = stage_message_bytes(model)
        two = clusters["pomona", 2]
        address = two.status().stages[0].address
        rtt = link_round_trip_s(address, message_bytes, two.node_secrets())
        paused_rtt = link_round_trip_s(address, message_bytes, two.node_secrets(), 100, PAUSE_S)
        rtts = {"pomona": rtt, "before": rtt, "ring": ring_round_trip_s()}
        # Warm up everything, then take rounds that visit every setup in turn, so that the
        # machine's drifts hit all setups alike; keep each setup's best run.
        runs: dict[object, list[tuple[float, ...]]] = {"mlx-lm": []}
        single_process(model, prompt_ids, 4)
        for key, cluster in clusters.items():
            cluster_run(cluster, prompt, raw, 4)
            runs[key] = []
        for _ in range(REPEATS):
            runs["mlx-lm"].append(single_process(model, prompt_ids, new_tokens))
            for key, cluster in clusters.items():
                runs[key].append(measured_run(cluster, prompt, raw, new_tokens))
        concurrency = concurrent_ratio(clusters["pomona", 2], prompt, raw, new_tokens)
    best = {key: (max(r[0] for r in v), max(r[1] for r in v)) for key, v in runs.items()}
    # The stage compute of each cluster's fastest decode run: its token time splits into the
    # stages' compute and the time between them (wire, threads, the engines' bookkeeping).
    compute = {key: max(v, key=lambda r: r[1])[2] for key, v in runs.items() if key != "mlx-lm"}
    sp_prefill, sp_decode = best["mlx-lm"]
    print(f"\n== {name}: prompt {len(prompt_ids)} tokens, {new_tokens} new tokens, "
          f"best of {REPEATS} ==")
    print(f"{'setup':<16}{'prefill tok/s':>14}{'decode tok/s':>14}{'prefill x':>11}"
          f"{'decode x':>10}{'vs mlx-lm':>12}{'transport':>12}{'N x RTT/2':>12}{'ratio':>7}")
    print(f"{'mlx-lm 1 proc':<16}{sp_prefill:>14.1f}{sp_decode:>14.1f}{1:>11.2f}{1:>10.2f}")
    for label, stages in clusters:
        one_stage_s = 1 / best["pomona" if label == "ring" else label, 1][1]
        prefill, decode = best[label, stages]
        # Per token: extra time over single-process mlx-lm, and the part of it that the network
        # adds (over Pomona's own 1-stage cluster, which runs the same engine with no hop).
        overhead_s = 1 / decode - 1 / sp_decode
        transport_s = 1 / decode - one_stage_s
        # A ring of N stages sends N one-way messages per token: N x RTT / 2.
        budget_s = stages * rtts[label] / 2 if stages > 1 else 0.0
        ratio = f"{transport_s / budget_s:>7.2f}" if budget_s else f"{'':>7}"
        print(f"{f'{label} {stages} stage':<16}{prefill:>14.1f}{decode:>14.1f}"
              f"{prefill / sp_prefill:>11.2f}{decode / sp_decode:>10.2f}"
              f"{overhead_s * 1e3:>9.2f} ms{transport_s * 1e3:>9.2f} ms{budget_s * 1e3:>9.2f} ms{ratio}")
    print(f"raw round trip ({message_bytes} B, the data plane's gRPC stack and threads, loopback): "
          f"{rtt * 1e6:.0f} us; mlx-ring ({FRAME_BYTES} B frame, the ring link's threads): "
          f"{rtts['ring'] * 1e6:.0f} us; a ring of N stages sends N one-way messages per token")
    print(f"  same, after a {PAUSE_S * 1e3:.0f} ms pause before each message (both ends idle, as "
          f"between a ring's tokens): {paused_rtt * 1e6:.0f} us")
    print("where a token's time goes (ms): 'compute' is the stages' own compute (each worker times "
          "its decode steps), 'between' the rest (wire, threads, the engines' bookkeeping); + is "
          "over the 1-stage cluster, and the ratio is +between / (N x RTT/2)")
    print(f"{'setup':<16}{'token':>8}{'compute':>9}{'between':>9}{'+compute':>10}{'+between':>10}"
          f"{'N x RTT/2':>11}{'ratio':>7}")
    for label, stages in clusters:
        token_s = 1 / best[label, stages][1]
        base = ("pomona" if label == "ring" else label, 1)
        base_between = 1 / best[base][1] - compute[base]
        between_s = token_s - compute[label, stages]
        row = (f"{f'{label} {stages} stage':<16}{token_s * 1e3:>8.2f}{compute[label, stages] * 1e3:>9.2f}"
               f"{between_s * 1e3:>9.2f}")
        if stages > 1:
            budget_s = stages * rtts[label] / 2
            row += (f"{(compute[label, stages] - compute[base]) * 1e3:>+10.2f}"
                    f"{(between_s - base_between) * 1e3:>+10.2f}{budget_s * 1e3:>11.2f}"
                    f"{(between_s - base_between) / budget_s:>7.2f}")
        print(row)
    print(f"2 concurrent requests on 2 stages: {concurrency:.2f}x one request's throughput")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", default="smollm2,tiny")
    parser.add_argument("--compare", type=Path, metavar="TREE",
                        help="also run clusters on the Pomona code in TREE (rows 'before')")
    args = parser.parse_args()
    trees = {"pomona": None, **({"before": args.compare.resolve()} if args.compare else {})}
    with tempfile.TemporaryDirectory(prefix="pomona-bench-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name == "smollm2":
                model = build_model(load_gguf(fetch_default_model(True)))
                bench_model(name, "default", model, False, PROMPT, args.new_tokens, work, trees)
            elif name == "tiny":
                path = make_tiny_checkpoint("llama", work / "tiny-llama")
                model, _ = load_model(path)
                bench_model(name, path, model, True, PROMPT, args.new_tokens * 4, work, trees)
            else:
                raise SystemExit(f"unknown model {name!r} (smollm2, tiny)")
            del model


if __name__ == "__main__":
    main()
