"""Expert-parallel benchmark on a tiny MoE (Mixtral format, 8 layers, 16 experts, top-2), in one run:
single-process mlx-lm; Pomona with every expert local (1 and 2 stages, the baselines); one stage
plus one and plus two expert nodes; two stages plus four expert nodes.

Prints prefill and decode tok/s, ratios to single-process, the per-MoE-layer dispatch overhead next
to one raw round trip of a dispatch-sized message on the data plane's own gRPC stack and threads,
measured in the same run, and bytes on the wire per token.

    .venv/bin/python bench/expert_bench.py [--new-tokens 64] [--compare TREE]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import load_model
from pipeline_bench import REPEATS, cluster_run, code_from, link_round_trip_s, single_process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from cluster_helpers import running_cluster  # noqa: E402
from tiny_models import make_tiny_checkpoint  # noqa: E402

from pomona.proto import worker_pb2  # noqa: E402
from pomona.tokenizer import load_tokenizer  # noqa: E402
from worker.wire import encode_tensor  # noqa: E402

LAYERS, EXPERTS = 8, 16
PROMPT = "Each token is sent to the experts that the router chooses, and the results are added."


def _experts(nodes: list[str]) -> list[dict]:
    share = EXPERTS // len(nodes)
    return [
        {"node": node, "layers": [0, LAYERS], "experts": [i * share, (i + 1) * share]}
        for i, node in enumerate(nodes)
    ]


# name -> (nodes, stages, experts entries, baseline name, dispatch destinations per MoE layer)
SETUPS = {
    "1 stage, local": (1, [[0, LAYERS]], None, None, 0),
    "2 stages, local": (2, [[0, 4], [4, LAYERS]], None, None, 0),
    "1 stage + 1 EP": (2, [[0, LAYERS]], _experts(["b"]), "1 stage, local", 1),
    "1 stage + 2 EP": (3, [[0, LAYERS]], _experts(["b", "c"]), "1 stage, local", 2),
    "2 stages + 4 EP": (6, [[0, 4], [4, LAYERS]], _experts(["c", "d", "e", "f"]),
                        "2 stages, local", 4),
}


# With --compare, these run on the other tree too (fewer processes than every setup twice).
COMPARED = ("1 stage, local", "1 stage + 1 EP", "1 stage + 2 EP")


def dispatch_message_bytes(model) -> int:
    """Bytes of a decode step's dispatch to one node: one token's hidden state [1, D] in the
    model's activation dtype and one (token, expert) pair; the reply carries one [1, D] output."""
    hidden = model.model.embed_tokens(mx.array([[0]]))[0]  # [1, D]
    request = worker_pb2.ExpertRequest(
        layer=LAYERS - 1, hidden=encode_tensor(hidden), pair_rows=[0], pair_experts=[EXPERTS - 1],
        dispatch_id=2**40,
    )
    reply = worker_pb2.ExpertReply(output=encode_tensor(hidden), dispatch_id=2**40)
    return max(request.ByteSize(), reply.ByteSize())


def wire_bytes(cluster) -> int:
    stats = cluster.expert_stats()
    return sum(
        link.bytes_sent + link.bytes_received for node in stats.nodes for link in node.stats.links
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compare", type=Path, metavar="TREE",
                        help="also run the 1-stage setups on the Pomona code in TREE")
    args = parser.parse_args()
    setups = dict(SETUPS)
    trees = {name: None for name in SETUPS}
    if args.compare:
        for name in COMPARED:
            nodes, stages, experts, baseline, destinations = SETUPS[name]
            baseline = f"before: {baseline}" if baseline else None
            setups[f"before: {name}"] = (nodes, stages, experts, baseline, destinations)
            trees[f"before: {name}"] = args.compare.resolve()
    new_tokens = args.new_tokens
    with tempfile.TemporaryDirectory(prefix="pomona-ep-bench-") as tmp:
        work = Path(tmp)
        path = make_tiny_checkpoint(
            "mixtral", work / "moe", num_layers=LAYERS, num_local_experts=EXPERTS,
            num_experts_per_tok=2,
        )
        model, _ = load_model(path)
        prompt_ids = load_tokenizer(path).encode(PROMPT)
        with contextlib.ExitStack() as stack:
            clusters = {}
            for i, (name, (nodes, stages, experts, _, _)) in enumerate(setups.items()):
                with code_from(trees[name]):
                    clusters[name] = stack.enter_context(
                        running_cluster(work / f"c{i}", path, nodes, stages, experts)
                    )
            message_bytes = dispatch_message_bytes(model)
            one_ep = clusters["1 stage + 1 EP"]
            rtt = link_round_trip_s(one_ep.status().stages[1].address, message_bytes, one_ep.node_secrets())
            runs: dict[str, list] = {"mlx-lm": [], **{name: [] for name in setups}}
            single_process(model, prompt_ids, 4)
            for cluster in clusters.values():
                cluster_run(cluster, PROMPT, True, 4)  # warm-up
            traffic = {}
            for _ in range(REPEATS):
                runs["mlx-lm"].append(single_process(model, prompt_ids, new_tokens))
                for name, cluster in clusters.items():
                    before = wire_bytes(cluster)
                    runs[name].append(cluster_run(cluster, PROMPT, True, new_tokens)[:2])
                    traffic[name] = (wire_bytes(cluster) - before) / (len(prompt_ids) + new_tokens)
    best = {name: (max(r[0] for r in v), max(r[1] for r in v)) for name, v in runs.items()}
    sp_prefill, sp_decode = best["mlx-lm"]
    print(f"\n== tiny MoE: {LAYERS} layers, {EXPERTS} experts, top-2; prompt {len(prompt_ids)} "
          f"tokens, {new_tokens} new tokens, best of {REPEATS} ==")
    print(f"{'setup':<26}{'prefill tok/s':>14}{'decode tok/s':>14}{'prefill x':>11}{'decode x':>10}"
          f"{'per MoE layer':>15}{'/ RTT':>7}{'wire B/token':>14}")
    print(f"{'mlx-lm 1 proc':<26}{sp_prefill:>14.1f}{sp_decode:>14.1f}{1:>11.2f}{1:>10.2f}")
    for name, (_, _, _, baseline, _) in setups.items():
        prefill, decode = best[name]
        extra = ""
        if baseline is not None:
            per_layer_s = (1 / decode - 1 / best[baseline][1]) / LAYERS
            extra = f"{per_layer_s * 1e3:>12.2f} ms{per_layer_s / rtt:>7.2f}{traffic[name]:>14.0f}"
        print(f"{name:<26}{prefill:>14.1f}{decode:>14.1f}{prefill / sp_prefill:>11.2f}"
              f"{decode / sp_decode:>10.2f}{extra}")
    print(f"raw round trip ({message_bytes} B, the data plane's gRPC stack and threads, loopback): "
          f"{rtt * 1e6:.0f} us. "
          "Per MoE layer = extra decode time per token over the same stages with local experts, "
          "divided by the MoE layers.")


if __name__ == "__main__":
    main()
