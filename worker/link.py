"""The outbound half of the data plane: one persistent client stream to the next stage.

Messages are queued and written in order on a single ``Forward`` call; gRPC drains the queue on its
own thread, so the engine never blocks on the network.
"""

from __future__ import annotations

import logging
import queue

import grpc

from pomona.grpc_options import CHANNEL_OPTIONS
from pomona.proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class NextStageLink:
    def __init__(self, address: str):
        self.address = address
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        # wait_for_ready: the next stage may still be starting when this one finishes loading.
        self._call = stub.Forward.future(self._messages(), wait_for_ready=True)
        self._call.add_done_callback(self._on_done)

    def _messages(self):
        while True:
            message = self._queue.get()
            if message is None:
                return
            yield message

    def _on_done(self, call) -> None:
        if call.cancelled():
            return
        error = call.exception()
        if error is not None:
            # Expected while a cluster shuts down (stages stop one by one); a failure otherwise.
            log.warning("stream to the next stage at %s closed: %s", self.address, error.details())

    def send(self, message: worker_pb2.StageMessage) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)
        self._channel.close()
