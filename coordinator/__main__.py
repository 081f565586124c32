"""``python -m coordinator``: bring up the cluster of a cluster.yaml and serve it until stopped.

``pomona up`` starts this in the background, with the cluster's token in ``<state-dir>/token``.
It writes its state (pid, address, the local processes it started with their create times, the
TLS files clients need) to ``<state-dir>/cluster.json`` so that ``pomona generate|status|down``
find it; ``down`` signals a recorded pid only if its create time still matches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from pomona import auth
from pomona.cluster_record import process_identity
from pomona.config import load_cluster_config
from pomona.errors import PomonaError
from pomona.grpc_options import COORDINATOR_MESSAGE_BYTES, server_options
from pomona.proto import coordinator_pb2_grpc

from .cluster import Cluster
from .http_api import HttpApi
from .service import CoordinatorService

log = logging.getLogger("coordinator")

# After a failed start, stay up this long so `pomona up` can read why, then exit.
FAILED_LINGER_S = 30.0
# Client streams (Generate) the coordinator serves at once; more are refused, not queued.
MAX_COORDINATOR_RPCS = 512
STREAMS_PER_CLIENT = 128


def _remote_identity(process) -> dict:
    pid, started = getattr(process, "remote_identity", None) or (None, "")
    return {"host": process.node.host, "remote_pid": pid, "remote_start": started}


def _write_state(state_dir: Path, cluster: Cluster, address: str) -> None:
    tls = cluster.config.tls
    state = {
        **process_identity(os.getpid()),
        "address": address,
        "config": str(cluster.config.path),
        # Local children only, by the pid their launch gave us (never a pid a worker reports,
        # nor an SSH worker's: that one is a pid on another host).
        "local_workers": {
            name: process_identity(node.process.local_pid)
            for name, node in cluster.nodes.items()
            if node.process is not None and node.process.local_pid is not None
        },
        # For information, and for `down` to stop a leftover over SSH after checking its start
        # time there; never signalled here.
        "remote_workers": {
            name: _remote_identity(node.process)
            for name, node in cluster.nodes.items()
            if node.process is not None and node.process.local_pid is None
        },
        "tls": {"ca": tls.ca, "cert": tls.cert, "key": tls.key} if tls else None,
    }
    tmp = state_dir / "cluster.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_dir / "cluster.json")


async def run(config_path: Path, state_dir: Path) -> int:
    config = load_cluster_config(config_path)
    state_dir.mkdir(parents=True, exist_ok=True)
    token_path = state_dir / auth.TOKEN_FILE
    if not token_path.exists():  # started by hand, not by `pomona up`
        auth.write_token(token_path, auth.cluster_token(config))
    cluster = Cluster(config=config, log_dir=state_dir / "logs", state_dir=state_dir,
                      token=auth.read_token(token_path))
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    server = grpc.aio.server(
        options=server_options(COORDINATOR_MESSAGE_BYTES, STREAMS_PER_CLIENT),
        interceptors=[auth.AioTokenCheck(cluster.token)],
        maximum_concurrent_rpcs=MAX_COORDINATOR_RPCS,
    )
    service = CoordinatorService(cluster, stop)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server)
    address = config.coordinator.address
    bound = auth.add_port(server, address, cluster.secrets)
    if bound == 0:
        print(f"pomona coordinator: cannot listen on {address} (is the port in use?)", file=sys.stderr)
        return 2
    await server.start()
    # The HTTP API shares this event loop and the cluster's request router; it answers (503)
    # while the cluster comes up.
    http_api = HttpApi(cluster, service, config.api) if config.api.enabled else None
    if http_api is not None:
        try:
            await http_api.start()
        except PomonaError as error:
            print(f"pomona coordinator: {error}", file=sys.stderr)
            await server.stop(grace=None)
            return 2
    _write_state(state_dir, cluster, address)
    starting = asyncio.create_task(cluster.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and starting.exception() is not None:
        code = 1
        _write_state(state_dir, cluster, address)
        try:
            await asyncio.wait_for(stop.wait(), FAILED_LINGER_S)
        except TimeoutError:
            pass
    else:
        if starting.done():
            _write_state(state_dir, cluster, address)  # now with the workers' pids
            log.info("cluster ready at %s", address)
            await stop.wait()
        else:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    if http_api is not None:
        await http_api.stop()
    await cluster.stop()
    await server.stop(grace=1)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("cluster.yaml"))
    parser.add_argument("--state-dir", type=Path, default=Path(".pomona"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
    try:
        return asyncio.run(run(args.config, args.state_dir))
    except PomonaError as error:
        print(f"pomona coordinator: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
