"""gRPC settings shared by every channel and server in Pomona, and the servers' input bounds."""

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # prefill chunks of big models exceed gRPC's 4 MiB default
# What a server accepts in one message. A worker launched by the coordinator gets a cap from the
# model (`message_limit_bytes`); one started by hand before the model is known gets the default.
DEFAULT_WORKER_MESSAGE_BYTES = 64 * 1024 * 1024
COORDINATOR_MESSAGE_BYTES = 16 * 1024 * 1024  # prompts and chat histories
MESSAGE_MARGIN_BYTES = 1024 * 1024  # protobuf framing, small fields, link probes' 2 MB messages
# Streams one connection may hold open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): a peer
# needs a handful (Forward, Results, Experts, Ping, a few unary calls). Calls beyond
# MAX_CONCURRENT_RPCS in all are refused with RESOURCE_EXHAUSTED, so a flood cannot take every
# handler thread (WORKER_THREADS) from the ring's own streams.
MAX_STREAMS_PER_CONNECTION = 32
MAX_CONCURRENT_RPCS = 48
WORKER_THREADS = 64


def message_limit_bytes(hidden_size: int, chunk_tokens: int, experts_per_token: int) -> int:
    """The largest message a worker of this model needs: a prefill chunk's hidden states, or its
    expert replies (each token once per chosen expert), at 4 bytes per value, plus a margin."""
    if hidden_size <= 0:
        return DEFAULT_WORKER_MESSAGE_BYTES
    values = hidden_size * max(chunk_tokens, 1) * max(experts_per_token, 1)
    return max(values * 4, 2 * 1024 * 1024) + MESSAGE_MARGIN_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# Data-plane links (stage to stage, stage to expert node) ping their peer every second and should
# give up after another second without an answer, so that a peer that vanishes without closing its
# sockets (a powered-off Mac, a pulled cable) fails its requests instead of hanging them. Not
# effective alone: a SIGSTOPped peer kept its transport for ~61 s (README, "What remains"); the
# coordinator's heartbeats (coordinator/heartbeat.py) detect such a node within 3 s.
DATA_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# A server must own its port: gRPC's default SO_REUSEPORT would let a second worker bind the same
# port and silently take half of its calls.
# It also accepts the data plane's keepalive pings (by default a server answers pings more often
# than every 5 minutes on an idle stream with GOAWAY).
def server_options(
    max_message_bytes: int, streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
) -> list:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_concurrent_streams", streams_per_connection),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
        ("grpc.http2.max_ping_strikes", 0),
    ]
