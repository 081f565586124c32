"""``python -m worker``: run one Pomona worker until told to stop.

The worker answers only calls that carry the cluster's token. A worker the coordinator launches
reads its secrets (token, TLS material) as the first line of its stdin (``--secrets-stdin``), so
they never appear on a command line or in the environment; one started by hand (``launch:
manual``) reads the token from ``--token-file`` and TLS files from ``--tls-*``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from pomona import auth
from pomona.grpc_options import DEFAULT_WORKER_MESSAGE_BYTES

from .server import serve


def _exit_when_stdin_closes(stopped: threading.Event) -> None:
    # The process that started us holds our stdin; when it goes away (even killed), we go too.
    while sys.stdin.buffer.read(65536):
        pass
    stopped.set()


def _secrets(args) -> auth.NodeSecrets:
    if args.secrets_stdin:
        return auth.NodeSecrets.from_line(sys.stdin.buffer.readline())
    if args.token_file is None:
        raise auth.AuthError(
            "no cluster token: pass --token-file with the cluster's token (the coordinator's "
            "auth.token_file, or .pomona/token where `pomona up` ran)"
        )
    tls_files = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(tls_files) and not all(tls_files):
        raise auth.AuthError("TLS needs all three of --tls-ca, --tls-cert and --tls-key")
    tls = auth.TlsPems.from_files(*tls_files) if all(tls_files) else None
    return auth.NodeSecrets(auth.read_token(args.token_file), tls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="stop when standard input closes"
    )
    parser.add_argument("--secrets-stdin", action="store_true",
                        help="read the cluster's secrets from stdin's first line (the coordinator's way)")
    parser.add_argument("--token-file", type=Path, help="a file holding the cluster's token")
    parser.add_argument("--tls-ca", type=Path, help="the cluster's CA certificate (PEM)")
    parser.add_argument("--tls-cert", type=Path, help="this node's certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="this node's private key (PEM)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_WORKER_MESSAGE_BYTES,
                        help="largest message accepted (the coordinator sets it from the model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        server, stopped = serve(args.host, args.port, _secrets(args), args.max_message_bytes)
    except (OSError, auth.AuthError) as error:
        print(f"pomona worker: {error}", file=sys.stderr)
        return 2
    print(f"pomona worker listening on {args.host}:{args.port}", flush=True)
    if args.exit_on_stdin_eof:
        threading.Thread(target=_exit_when_stdin_closes, args=(stopped,), daemon=True).start()
    stopped.wait()
    server.stop(grace=1).wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
