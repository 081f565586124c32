"""gRPC settings shared by every channel and server in Pomona."""

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # prefill chunks of big models exceed gRPC's 4 MiB default

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# Data-plane links (stage to stage, stage to expert node) ping their peer every second and should
# give up after another second without an answer, so that a peer that vanishes without closing its
# sockets (a powered-off Mac, a pulled cable) fails its requests instead of hanging them. Not yet
# effective: a SIGSTOPped peer took ~61 s to fail a request (README, "What remains").
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
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]
