"""Tensors on the wire: raw bytes + dtype + shape. bfloat16 travels as its raw 16-bit pattern, since
numpy has no bfloat16; ``np.asarray`` of an MLX array is zero-copy, so the only copy is into the
protobuf bytes field."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pomona.proto import worker_pb2

_TO_MX = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "int32": mx.int32,
}


def encode_tensor(array: mx.array) -> worker_pb2.Tensor:
    """``array`` (evaluated here) as raw bytes in its own dtype: the model's activations travel
    at their own precision (bfloat16 as 2 bytes), never widened."""
    return tensor_from_host(*host_view(array))


def host_view(array: mx.array) -> tuple[np.ndarray, str]:
    """A zero-copy numpy view of ``array`` (evaluating it) and its dtype name; bfloat16 is viewed
    as its raw 16-bit pattern. Slice it with numpy and send slices with ``tensor_from_host``."""
    dtype = str(array.dtype).removeprefix("mlx.core.")
    if dtype not in _TO_MX:
        raise ValueError(f"cannot send a tensor of dtype {dtype}")
    raw = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
    return np.asarray(raw), dtype


def tensor_from_host(host: np.ndarray, dtype: str) -> worker_pb2.Tensor:
    return worker_pb2.Tensor(data=host.tobytes(), dtype=dtype, shape=list(host.shape))


def decode_tensor(tensor: worker_pb2.Tensor) -> mx.array:
    dtype = _TO_MX.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"received a tensor of unknown dtype {tensor.dtype!r}")
    if dtype == mx.bfloat16:
        raw = np.frombuffer(tensor.data, dtype=np.uint16)
        return mx.array(raw).view(mx.bfloat16).reshape(tuple(tensor.shape))
    numpy_dtype = np.dtype(tensor.dtype)
    return mx.array(np.frombuffer(tensor.data, dtype=numpy_dtype).reshape(tuple(tensor.shape)))
