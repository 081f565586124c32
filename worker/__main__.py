"""``python -m worker``: run one Pomona worker until told to stop."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from .server import serve


def _exit_when_stdin_closes(stopped: threading.Event) -> None:
    # The process that started us holds our stdin; when it goes away (even killed), we go too.
    while sys.stdin.buffer.read(65536):
        pass
    stopped.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="stop when standard input closes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        server, stopped = serve(args.host, args.port)
    except OSError as error:
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
