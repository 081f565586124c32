"""The worker's Profile rpc: the compute profile of a model on this node, and its power draw where
a meter exists. Runs on the engine thread (MLX's one thread), before any shard loads."""

from __future__ import annotations

import time

import mlx.core as mx

from pomona.power import detect_meter_with_reasons, measure_idle_and_busy
from pomona.profile_codec import compute_to_proto
from pomona.proto import worker_pb2

from .profiler import profile_compute_cached

POWER_IDLE_S = 2.0
POWER_BUSY_S = 3.0


def _busy_loop() -> None:
    """A stretch of full-speed compute for the busy power reading: large matrix products."""
    a = mx.random.normal((1024, 1024))
    for _ in range(8):
        a = (a @ a) * (1.0 / 1024)
    mx.eval(a)


def profile_node(request: worker_pb2.ProfileRequest) -> worker_pb2.ProfileReply:
    started = time.monotonic()
    profile, cached = profile_compute_cached(
        request.model_path,
        prefill_chunk_tokens=request.prefill_chunk_tokens or 256,
        short_context=request.short_context or 64,
        long_context=request.long_context or 1024,
        time_budget_s=request.time_budget_s or 60.0,
    )
    reply = worker_pb2.ProfileReply(
        compute=compute_to_proto(profile), cached=cached, elapsed_s=time.monotonic() - started
    )
    meter, reasons = detect_meter_with_reasons()
    if meter is None:
        reply.power_note = "; ".join(reasons)
        return reply
    try:
        power = measure_idle_and_busy(meter, _busy_loop, idle_s=POWER_IDLE_S, busy_s=POWER_BUSY_S)
    except (OSError, RuntimeError, ValueError) as error:
        reply.power_note = f"{meter.name}: the meter failed while measuring ({error})"
        return reply
    finally:
        meter.close()
    reply.power_measured = True
    reply.idle_w, reply.busy_w, reply.power_meter = power.idle_w, power.busy_w, meter.name
    return reply
