"""gRPC settings shared by every channel and server in Pomona."""

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # prefill chunks of big models exceed gRPC's 4 MiB default

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
