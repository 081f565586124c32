"""Who may talk to a Pomona node: the cluster's secret and, optionally, mutual TLS.

Every call to a coordinator or a worker carries the cluster's token as call metadata
(``pomona-token``); a server interceptor compares it in constant time and answers any call without
it, or with another, UNAUTHENTICATED before the method runs (its request is not even parsed).
With ``tls:`` in cluster.yaml every channel is also mutual TLS: each side shows a certificate
signed by the cluster's CA and checks the other's.

This module owns the ``NodeSecrets`` a process holds (token + TLS PEMs), how they travel to a
worker (one JSON line on its stdin: over the pipe for local workers, over the SSH channel for
remote ones, never on a command line), the token file (mode 0600), the server interceptors (sync
and aio) and the client channels (sync and aio) that attach the token. A worker installs its
secrets once at start (``install``); its outbound links then use them through ``channel``.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from pomona.errors import PomonaError

TOKEN_KEY = "pomona-token"  # gRPC metadata keys are lowercase
TOKEN_FILE = "token"  # in the state directory (.pomona/)
_REFUSED = (
    "this Pomona node requires the cluster's token (call metadata 'pomona-token'): the call "
    "{problem}; clients find it in .pomona/token of the directory where `pomona up` ran"
)


class AuthError(PomonaError):
    """Secrets that are missing or unreadable."""


@dataclass(frozen=True)
class TlsPems:
    """PEM bytes: the cluster's CA, and this node's certificate and private key."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path) -> TlsPems:
        return cls(*(_read_secret(Path(path), what) for path, what in
                     ((ca, "TLS CA"), (cert, "TLS certificate"), (key, "TLS key"))))


@dataclass(frozen=True)
class NodeSecrets:
    token: str
    tls: TlsPems | None = None

    def to_line(self) -> bytes:
        """One line of JSON, for a worker's stdin."""
        body: dict = {"token": self.token}
        if self.tls is not None:
            body["tls"] = {k: getattr(self.tls, k).decode() for k in ("ca", "cert", "key")}
        return json.dumps(body).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> NodeSecrets:
        try:
            body = json.loads(line)
            tls = body.get("tls")
            pems = TlsPems(*(tls[k].encode() for k in ("ca", "cert", "key"))) if tls else None
            token = body["token"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AuthError("the secrets line on stdin is not what `pomona up` sends") from None
        if not isinstance(token, str) or not token:
            raise AuthError("the secrets line on stdin has no token")
        return cls(token, pems)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cluster_token(config) -> str:
    """The token of a ClusterConfig: its `auth.token_file`'s, else a new one."""
    return read_token(Path(config.auth.token_file)) if config.auth.token_file else new_token()


def write_token(path: Path, token: str) -> None:
    write_private(path, token.encode() + b"\n")


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable by its owner only (0600, also if it existed)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through os.open
        file.write(data)


def read_token(path: Path) -> str:
    token = _read_secret(path, "token file").decode(errors="replace").strip()
    if not token:
        raise AuthError(f"the token file {path} is empty; put the cluster's secret in it")
    return token


def _read_secret(path: Path, what: str) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as error:
        raise AuthError(f"cannot read the {what} {path}: {error.strerror}") from None


# -- the process's own secrets (a worker's outbound links use them) ----------------------------

_installed: NodeSecrets | None = None


def install(node_secrets: NodeSecrets) -> None:
    global _installed
    _installed = node_secrets


def installed() -> NodeSecrets:
    if _installed is None:
        raise AuthError("this process has no cluster secrets installed (auth.install)")
    return _installed


# -- servers -----------------------------------------------------------------------------------


def _accepts(token: str, metadata) -> str:
    """"" if the metadata carries ``token``, else what is wrong with it."""
    given = [value for key, value in metadata or () if key == TOKEN_KEY]
    if not given:
        return "carries no token"
    value = given[0].encode() if isinstance(given[0], str) else given[0]
    if len(given) > 1 or not hmac.compare_digest(value, token.encode()):
        return "carries a wrong token"
    return ""


def _refusal(handler, problem: str, aio: bool):
    """A handler of ``handler``'s kind that refuses without parsing the request."""
    message = _REFUSED.format(problem=problem)
    if aio:
        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    else:
        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    streaming_in = bool(handler and handler.request_streaming)
    streaming_out = bool(handler and handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(streaming_in, streaming_out)]
    return make(refuse)  # no deserializer: the bytes stay unread


class TokenCheck(grpc.ServerInterceptor):
    """Sync servers: refuse every call that does not carry the cluster's token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_service(self, continuation, handler_call_details):
        problem = _accepts(self._token, handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        return _refusal(handler, problem, aio=False) if problem else handler


class AioTokenCheck(grpc.aio.ServerInterceptor):
    """grpc.aio servers: refuse every call that does not carry the cluster's token."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        problem = _accepts(self._token, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        return _refusal(handler, problem, aio=True) if problem else handler


def add_port(server, address: str, node_secrets: NodeSecrets) -> int:
    """Listen on ``address``: mutual TLS (client certificates required) when the secrets have
    TLS, plain TCP otherwise. Returns the port, 0 if it cannot be bound."""
    try:
        if node_secrets.tls is None:
            return server.add_insecure_port(address)
        tls = node_secrets.tls
        credentials = grpc.ssl_server_credentials(
            [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True
        )
        return server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises where older versions returned 0
        return 0


# -- clients -----------------------------------------------------------------------------------


def _with_token(metadata, token: str) -> list:
    return [*(metadata or ()), (TOKEN_KEY, token)]


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, details, token: str) -> None:
        self.method, self.timeout = details.method, details.timeout
        self.metadata = _with_token(details.metadata, token)
        self.credentials, self.wait_for_ready = details.credentials, details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class _AttachToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._token = token

    def _call(self, continuation, details, request):
        return continuation(_SyncDetails(details, self._token), request)

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


class _AioAttachToken:
    def __init__(self, token: str) -> None:
        self._token = token

    async def _call(self, continuation, details, request):
        metadata = _with_token(details.metadata, self._token)
        return await continuation(details._replace(metadata=metadata), request)


def _aio_interceptors(token: str) -> list:
    # grpc.aio picks an interceptor's kinds by its base classes: one object per kind.
    kinds = (
        grpc.aio.UnaryUnaryClientInterceptor,
        grpc.aio.UnaryStreamClientInterceptor,
        grpc.aio.StreamUnaryClientInterceptor,
        grpc.aio.StreamStreamClientInterceptor,
    )
    names = ("intercept_unary_unary", "intercept_unary_stream",
             "intercept_stream_unary", "intercept_stream_stream")
    return [type(f"AttachToken{i}", (_AioAttachToken, kind), {name: _AioAttachToken._call})(token)
            for i, (kind, name) in enumerate(zip(kinds, names))]


def _channel_credentials(tls: TlsPems) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                        certificate_chain=tls.cert)


def channel(address: str, options: list, node_secrets: NodeSecrets | None = None) -> grpc.Channel:
    """A sync channel to ``address`` whose every call carries the token (``node_secrets``, or
    this process's installed ones), over mutual TLS when the secrets have it."""
    node_secrets = node_secrets or installed()
    if node_secrets.tls is None:
        base = grpc.insecure_channel(address, options=options)
    else:
        base = grpc.secure_channel(address, _channel_credentials(node_secrets.tls), options=options)
    return grpc.intercept_channel(base, _AttachToken(node_secrets.token))


def aio_channel(address: str, options: list, node_secrets: NodeSecrets) -> grpc.aio.Channel:
    """The grpc.aio counterpart of ``channel``."""
    interceptors = _aio_interceptors(node_secrets.token)
    if node_secrets.tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    credentials = _channel_credentials(node_secrets.tls)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def cluster_secrets(config, token: str, node=None) -> NodeSecrets:
    """The secrets of the coordinator (``node`` None) or of one node of a ClusterConfig: the
    token, and with ``tls:`` the cluster's CA and the node's own certificate (or the shared one)."""
    tls = config.tls
    if tls is None:
        return NodeSecrets(token)
    own = node.tls if node is not None and node.tls is not None else tls
    return NodeSecrets(token, TlsPems.from_files(tls.ca, own.cert, own.key))


def state_secrets(state_dir: Path, tls_files: dict | None) -> NodeSecrets:
    """What the CLI (and tests) use to talk to a running cluster: the token ``pomona up`` wrote
    in ``state_dir`` and the TLS files cluster.json names (the coordinator's own)."""
    token_path = state_dir / TOKEN_FILE
    if not token_path.exists():
        raise AuthError(f"no {token_path}: the cluster's token is missing; restart it with "
                        "`pomona down` and `pomona up`")
    tls = TlsPems.from_files(tls_files["ca"], tls_files["cert"], tls_files["key"]) if tls_files else None
    return NodeSecrets(read_token(token_path), tls)
