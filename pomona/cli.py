"""The ``pomona`` command line: up, plan, generate, status, down, certs, fetch, upcycle, worker.

``up`` starts the coordinator in the background (it launches the workers) and records it in
``.pomona/cluster.json`` in the current directory, with the cluster's token in ``.pomona/token``
(mode 0600); the other commands find the cluster and the token there. ``down`` signals only
processes of this machine whose create time matches the record (a pid may have been reused).
Every failure prints one clear line and exits non-zero; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from pomona import auth
from pomona.cluster_record import (
    process_identity,
    recorded_state,
    running_state,
    same_process,
    stop_everything,
)
from pomona.config import OBJECTIVES, load_cluster_config
from pomona.display import (
    expert_stats_lines,
    placement_lines,
    prediction_lines,
    scheduler_lines,
    status_json,
)
from pomona.errors import PomonaError
from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.placement import validate_experts, validate_stages
from pomona.proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2

STATE_DIR = Path(".pomona")
UP_TIMEOUT_S = 1800.0


class CliError(PomonaError):
    pass


# -- the running cluster's record --------------------------------------------------------------


def _stub(address: str, node_secrets: auth.NodeSecrets) -> coordinator_pb2_grpc.CoordinatorStub:
    return coordinator_pb2_grpc.CoordinatorStub(auth.channel(address, CHANNEL_OPTIONS, node_secrets))


def _cluster_stub(state: dict, state_dir: Path) -> coordinator_pb2_grpc.CoordinatorStub:
    return _stub(state["address"], auth.state_secrets(state_dir, state.get("tls")))


def _running_cluster(state_dir: Path) -> dict:
    state = running_state(state_dir)
    if state is None:
        raise CliError(
            f"no cluster is running here (no live coordinator in {state_dir}/): "
            "start one with `pomona up`"
        )
    return state


# -- commands ----------------------------------------------------------------------------------


def _print_placement(status: coordinator_pb2.ClusterStatus) -> None:
    print("\n".join(placement_lines(status)))


def cmd_up(args) -> int:
    config = load_cluster_config(args.file)
    state_dir = args.state_dir
    existing = running_state(state_dir)
    if existing is not None:
        raise CliError(
            f"a cluster is already running here (coordinator pid {existing['pid']}): "
            "run `pomona down` first"
        )
    if config.model == "default":
        from pomona.fetch import fetch_default_model

        fetch_default_model(quiet=False)
    from pomona.modelinfo import describe_model

    # A bad model path or stage list fails here, before anything starts.
    model = describe_model(config.model)
    if config.stages:
        validate_stages(config.stages, model.num_layers)
    validate_experts(config.experts, model, node_names=[node.name for node in config.nodes])
    _check_machines(config)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    token = auth.cluster_token(config)
    auth.write_token(state_dir / auth.TOKEN_FILE, token)  # the coordinator reads it there
    node_secrets = auth.cluster_secrets(config, token)
    log_path = state_dir / "logs" / "coordinator.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--config", str(config.path),
             "--state-dir", str(state_dir.resolve())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stub = _stub(config.coordinator.address, node_secrets)
    deadline = time.monotonic() + UP_TIMEOUT_S
    last_line = ""
    status = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise CliError(f"the coordinator exited ({process.returncode}): {' | '.join(tail)}")
        try:
            status = stub.GetStatus(coordinator_pb2.ClusterStatusRequest(), timeout=2)
        except grpc.RpcError:
            time.sleep(0.3)
            continue
        line = status.message
        if status.stages:
            line += "  " + "  ".join(
                f"{s.node}:{s.state}{f' {s.load_fraction:.0%}' if s.state == 'loading' else ''}"
                for s in status.stages
            )
        if line != last_line:
            print(f"  {line}", flush=True)
            last_line = line
        if status.state in ("ready", "failed"):
            break
        time.sleep(0.3)
    if status is None or status.state != "ready":
        reason = status.error if status is not None and status.error else "timed out"
        coordinator = process_identity(process.pid)
        state = recorded_state(state_dir) or {}
        if not same_process(state):
            state = coordinator  # it died before recording itself: only our child to stop
        stop_everything({**state, "address": config.coordinator.address}, state_dir, node_secrets)
        process.wait(timeout=5)
        raise CliError(f"the cluster did not come up: {reason}")
    print(f"cluster ready; coordinator at {config.coordinator.address}")
    if config.transport != "grpc":
        print(f"stage-to-stage transport: {config.transport} (an mx.distributed ring of the stages; "
              "a lost stage needs a restart)")
    if config.api.enabled:
        print(f"HTTP API (OpenAI and Anthropic) at {config.api.url}/v1; web page at {config.api.url}/")
    status = stub.GetStatus(coordinator_pb2.ClusterStatusRequest(), timeout=5)
    _print_placement(status)
    print("\n".join(prediction_lines(status)))
    return 0


def _check_machines(config) -> None:
    """Catalogue names in cluster.yaml exist (before anything starts)."""
    from pomona.catalogue import machine

    for index, node in enumerate(config.nodes):
        if node.machine:
            try:
                machine(node.machine)
            except PomonaError as error:
                raise CliError(f"{config.path}: nodes[{index}].machine: {error}") from None


def cmd_plan(args) -> int:
    """Measure the cluster (or simulate one) and print the plan; nothing loads."""
    from pomona.plan_report import plan_json, plan_lines

    if args.simulate:
        plan_, profile = _simulated_plan(args)
    else:
        import asyncio
        from dataclasses import replace

        from coordinator.cluster import Cluster

        config = load_cluster_config(args.file)
        _check_machines(config)
        if args.objective:
            config = replace(config, scheduler=replace(config.scheduler, objective=args.objective))
        if running_state(args.state_dir) is not None:
            raise CliError("a cluster is running here; `pomona plan` starts its own nodes: run "
                           "`pomona down` first (or plan from another directory)")
        (args.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not args.json:
            print(f"measuring {len(config.nodes)} nodes and their links ...", flush=True)
        cluster = Cluster(config=config, log_dir=args.state_dir / "logs", state_dir=args.state_dir)
        plan_ = asyncio.run(cluster.measure_and_plan())
        profile = cluster.profile
    if args.json:
        print(json.dumps(plan_json(plan_, profile), indent=2))
    else:
        print("\n".join(plan_lines(plan_)))
    return 0


def _simulated_plan(args):
    from pomona.planner import plan
    from pomona.profiles import Workload
    from pomona.shapes import builtin_model
    from pomona.simulate import load_simulation_spec

    if not args.model:
        raise CliError("--simulate needs --model NAME (a built-in model shape)")
    shape = builtin_model(args.model)
    profile = load_simulation_spec(args.simulate, shape)
    workload = Workload(args.prompt_tokens, args.generated_tokens, args.concurrency)
    objective = args.objective or "balanced"
    kv_tokens = args.max_context * args.concurrency
    return plan(shape.info, profile, workload, objective, args.slack, kv_tokens), profile


def cmd_generate(args) -> int:
    state = _running_cluster(args.state_dir)
    sampling = worker_pb2.SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p
    )
    if args.seed is not None:
        sampling.seed = args.seed
    request = coordinator_pb2.GenerateRequest(
        prompt=args.prompt, raw=args.raw, max_tokens=args.max_tokens, sampling=sampling,
        stop=args.stop or [], ignore_eos=args.ignore_eos,
    )
    summary = None
    for chunk in _cluster_stub(state, args.state_dir).Generate(request):
        if chunk.HasField("summary"):
            summary = chunk.summary
        elif not args.json:
            print(chunk.text, end="", flush=True)
    if args.json:
        print(json.dumps({
            "text": summary.text,
            "token_ids": list(summary.token_ids),
            "prompt_tokens": summary.prompt_tokens,
            "generated_tokens": summary.generated_tokens,
            "finish_reason": summary.finish_reason,
            "ttft_s": round(summary.ttft_s, 6),
            "decode_tok_s": round(summary.decode_tok_s, 3),
            "energy_j": round(summary.energy_j, 6),
            "j_per_token": round(summary.j_per_token, 6),
            "energy_source": summary.energy_source,
        }))
    else:
        print()
    return 0


def cmd_status(args) -> int:
    state = _running_cluster(args.state_dir)
    if args.experts:
        stats = _cluster_stub(state, args.state_dir).GetExpertStats(
            coordinator_pb2.ExpertStatsQuery(), timeout=20
        )
        print("\n".join(expert_stats_lines(stats)))
        return 0
    status = _cluster_stub(state, args.state_dir).GetStatus(
        coordinator_pb2.ClusterStatusRequest(include_workers=True), timeout=10
    )
    if args.json:
        print(json.dumps(status_json(status), indent=2))
        return 0
    print(f"state: {status.state}" + (f" ({status.error})" if status.error else ""))
    print(f"active requests: {status.active_requests}")
    _print_placement(status)
    print("\n".join(prediction_lines(status) + scheduler_lines(status)))
    return 0


def cmd_down(args) -> int:
    state_dir = args.state_dir
    state = running_state(state_dir)
    if state is None:
        recorded = recorded_state(state_dir)
        if recorded is not None:
            # The coordinator is gone (a reused pid is another process: left alone). Its local
            # workers exit with it; any that did not and are still the same processes go now.
            stop_everything(recorded, state_dir, None)
            _stop_ssh_leftovers(recorded)
            print("no cluster is running here (removed the stale record in "
                  f"{state_dir / 'cluster.json'})")
        else:
            print("no cluster is running here")
        return 0
    try:
        node_secrets = auth.state_secrets(state_dir, state.get("tls"))
    except auth.AuthError as error:
        print(f"pomona: {error}; stopping the processes recorded instead", file=sys.stderr)
        node_secrets = None
    if stop_everything(state, state_dir, node_secrets):
        _stop_ssh_leftovers(state)  # the coordinator had to be killed: it stopped no one
    print("cluster stopped")
    return 0


def _stop_ssh_leftovers(state: dict) -> None:
    """SSH workers that outlived a dead coordinator (they ignored the end of their channel):
    over a new SSH session, killed only if the recorded pid still has the recorded start time."""
    remote = {name: worker for name, worker in state.get("remote_workers", {}).items()
              if worker.get("remote_pid") and worker.get("remote_start")}
    if not remote:
        return
    import asyncio

    from coordinator.launch import kill_remote_worker  # asyncssh: only when needed

    try:
        config = load_cluster_config(state["config"])
    except PomonaError as error:
        print(f"pomona: cannot check the SSH workers for leftovers: {error}", file=sys.stderr)
        return
    for name, worker in remote.items():
        pid, host = worker["remote_pid"], worker["host"]
        try:
            killed = asyncio.run(kill_remote_worker(config.node(name), pid, worker["remote_start"]))
        except (PomonaError, KeyError, OSError) as error:
            print(f"pomona: node {name!r}: cannot check for a leftover worker: {error}", file=sys.stderr)
            continue
        if killed:
            print(f"stopped the leftover worker of node {name!r} (pid {pid} on {host})")


def cmd_certs(args) -> int:
    """A CA and a certificate per node (and the coordinator) for cluster.yaml's `tls:`."""
    from pomona.certs import issue, make_ca
    from pomona.config import is_loopback

    config = load_cluster_config(args.file)
    out = Path(args.out) if args.out else config.path.parent / "pomona-certs"
    names = ["coordinator", *(node.name for node in config.nodes)]
    files = [out / "ca.pem", out / "ca-key.pem"]
    files += [out / f"{name}{suffix}" for name in names for suffix in (".pem", "-key.pem")]
    existing = [str(f) for f in files if f.exists()]
    if existing and not args.force:
        raise CliError(f"{existing[0]} exists; pass --force to replace the certificates in {out}")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, ca_key, ca_cert = make_ca()
    issued = {"ca": ca}
    for name, host in [("coordinator", config.coordinator.host),
                       *((node.name, node.host) for node in config.nodes)]:
        hosts = [host, "127.0.0.1", "localhost"] if is_loopback(host) else [host]
        issued[name] = issue(name, hosts, ca_key, ca_cert)
    for name, pair in issued.items():
        (out / f"{name}.pem").write_bytes(pair.cert_pem)
        auth.write_private(out / f"{name}-key.pem", pair.key_pem)
    shown = os.path.relpath(out, config.path.parent)
    print(f"wrote a CA and {len(names)} certificates to {out}; add to {config.path.name}:")
    print(f"tls: {{ca: {shown}/ca.pem, cert: {shown}/coordinator.pem, key: {shown}/coordinator-key.pem}}")
    for node in config.nodes:
        print(f"  # nodes[{node.name}]:  tls: {{cert: {shown}/{node.name}.pem, "
              f"key: {shown}/{node.name}-key.pem}}")
    print(f"keep {shown}/ca-key.pem private (it signs new certificates), or delete it")
    return 0


def cmd_fetch(args) -> int:
    from pomona.fetch import fetch_default_model

    print(fetch_default_model(quiet=False))
    return 0


def cmd_upcycle(args) -> int:
    from pomona.fetch import fetch_default_model
    from worker.upcycle import upcycle  # imports MLX: only this command pays for it

    out_dir = upcycle(
        fetch_default_model(quiet=False), args.out_dir,
        num_experts=args.experts, top_k=args.top_k, noise=args.noise, seed=args.seed,
    )
    size_mb = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()) / 1e6
    print(out_dir)
    print(
        f"mixtral-format MoE from the default model: {args.experts} experts per layer, "
        f"top-{args.top_k}, noise {args.noise}, seed {args.seed}, {size_mb:.0f} MB"
    )
    return 0


def cmd_worker(args) -> int:
    command = [sys.executable, "-m", "worker", "--host", args.host, "--port", str(args.port)]
    for flag in ("token_file", "tls_ca", "tls_cert", "tls_key"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    os.execv(sys.executable, command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pomona", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the cluster described by a cluster.yaml")
    up.add_argument("file", nargs="?", default="cluster.yaml")
    up.set_defaults(run=cmd_up)

    generate = commands.add_parser("generate", help="generate text for a prompt")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=0, help="default: cluster.yaml's")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--min-p", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", help="a stop string (repeatable)")
    generate.add_argument("--raw", action="store_true", help="skip the chat template")
    generate.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text")
    generate.add_argument("--json", action="store_true", help="print one JSON object at the end")
    generate.set_defaults(run=cmd_generate)

    plan = commands.add_parser(
        "plan", help="measure the cluster and show the placement the scheduler would choose"
    )
    plan.add_argument("file", nargs="?", default="cluster.yaml")
    plan.add_argument("--objective", choices=OBJECTIVES, help="default: cluster.yaml's, or balanced")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--simulate", metavar="SPEC.yaml", type=Path,
                      help="plan for a hypothetical cluster of catalogue Macs instead")
    plan.add_argument("--model", help="with --simulate: a built-in model shape")
    plan.add_argument("--prompt-tokens", type=int, default=512, help="with --simulate")
    plan.add_argument("--generated-tokens", type=int, default=256, help="with --simulate")
    plan.add_argument("--concurrency", type=int, default=1, help="with --simulate")
    plan.add_argument("--max-context", type=int, default=4096, help="with --simulate: KV budget")
    plan.add_argument("--slack", type=float, default=0.1, help="with --simulate: balanced slack")
    plan.set_defaults(run=cmd_plan)

    status = commands.add_parser("status", help="show the cluster, its placement and memory")
    status.add_argument("--experts", action="store_true", help="expert load statistics")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(run=cmd_status)
    down = commands.add_parser("down", help="stop everything `up` started")
    down.set_defaults(run=cmd_down)
    certs = commands.add_parser("certs", help="make a CA and node certificates for mutual TLS")
    certs.add_argument("file", nargs="?", default="cluster.yaml")
    certs.add_argument("--out", help="directory for the files (default: pomona-certs/ beside FILE)")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(run=cmd_certs)
    fetch = commands.add_parser("fetch", help="download the default model into the cache")
    fetch.set_defaults(run=cmd_fetch)
    upcycle = commands.add_parser(
        "upcycle", help="build a demo MoE checkpoint from the default model (sparse upcycling)"
    )
    upcycle.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    upcycle.add_argument("--experts", type=int, default=8, help="experts per layer")
    upcycle.add_argument("--top-k", type=int, default=2, help="experts chosen per token")
    upcycle.add_argument("--noise", type=float, default=0.05,
                         help="relative perturbation of each expert copy (0: identical experts)")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the router and the noise")
    upcycle.set_defaults(run=cmd_upcycle)
    worker = commands.add_parser("worker", help="run a worker for a `launch: manual` node")
    worker.add_argument("--host", default="0.0.0.0")
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--token-file", type=Path, required=True,
                        help="the cluster's token (cluster.yaml's auth.token_file)")
    worker.add_argument("--tls-ca", type=Path, help="with TLS: the cluster's CA certificate")
    worker.add_argument("--tls-cert", type=Path, help="with TLS: this node's certificate")
    worker.add_argument("--tls-key", type=Path, help="with TLS: this node's private key")
    worker.set_defaults(run=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except PomonaError as error:
        print(f"pomona: {error}", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(f"pomona: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
