"""ComputeProfile <-> its protobuf message (the worker's Profile reply). No MLX: the coordinator
decodes what workers send."""

from __future__ import annotations

from pomona.profiles import ComputeProfile
from pomona.proto import worker_pb2


def compute_to_proto(profile: ComputeProfile) -> worker_pb2.ComputeProfile:
    return worker_pb2.ComputeProfile(
        decode_layer_s=profile.decode_layer_s,
        decode_layer_long_s=profile.decode_layer_long_s,
        short_context=profile.short_context,
        long_context=profile.long_context,
        prefill_layer_s=profile.prefill_layer_s,
        prefill_chunk_tokens=profile.prefill_chunk_tokens,
        embed_s=profile.embed_s,
        head_s=profile.head_s,
        expert_s=profile.expert_s,
        experts_per_token=profile.experts_per_token,
        source=profile.source,
    )


def compute_from_proto(message: worker_pb2.ComputeProfile) -> ComputeProfile:
    return ComputeProfile(
        decode_layer_s=tuple(message.decode_layer_s),
        decode_layer_long_s=tuple(message.decode_layer_long_s),
        short_context=message.short_context,
        long_context=message.long_context,
        prefill_layer_s=tuple(message.prefill_layer_s),
        prefill_chunk_tokens=message.prefill_chunk_tokens,
        embed_s=message.embed_s,
        head_s=message.head_s,
        expert_s=tuple(message.expert_s),
        experts_per_token=message.experts_per_token,
        source=message.source,
    )
