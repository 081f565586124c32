"""gRPC settings shared by every channel and server in Pomona."""

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # prefill chunks of big models exceed gRPC's 4 MiB default

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# A server must own its port: gRPC's default SO_REUSEPORT would let a second worker bind the same
# port and silently take half of its calls.
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
