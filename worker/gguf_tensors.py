"""One GGUF tensor, read by its offset and converted to what ``mx.load`` would give for it.

``mx.load`` reads a whole GGUF file at once; a pipeline stage wants only its own layers. So each
tensor is read on its own (``os.pread`` at the offset the header gives) and converted the way MLX's
GGUF reader converts it: Q4_0, Q4_1 and Q8_0 blocks become MLX's affine quantized layout (packed
uint32 ``weight``, float16 ``scales`` and ``biases``, group size 32) without dequantizing,
F32 / F16 / BF16 stay as stored, and any other type is dequantized (with the ``gguf`` package) to
float16, as MLX does. A test checks every supported type against ``mx.load`` bit for bit.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from pomona.errors import ModelError
from pomona.gguf_header import GgufTensor

GROUP_SIZE = 32  # every block type MLX keeps quantized holds 32 weights per block
QUANTIZED_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}
_FLOATS = {T.F32: np.float32, T.F16: np.float16}


def read_tensor(fd: int, tensor: GgufTensor, rows: list[int] | None = None) -> dict[str, mx.array]:
    """The tensor's arrays by suffix: {"weight"} for floats, {"weight", "scales", "biases"} for
    the quantized types MLX keeps packed. ``rows``: only these rows along axis 0 (the experts of
    a stacked expert tensor), each read on its own, in that order."""
    shape = tensor.shape
    if rows is None:
        raw = _pread(fd, tensor.nbytes, tensor.offset, tensor.name)
    else:
        row_bytes = tensor.nbytes // shape[0]  # axis 0 is the slowest: each row is contiguous
        raw = b"".join(_pread(fd, row_bytes, tensor.offset + r * row_bytes, tensor.name) for r in rows)
        shape = (len(rows), *shape[1:])
    kind = T(tensor.ggml_type)
    if kind in _FLOATS:
        return {"weight": mx.array(np.frombuffer(raw, _FLOATS[kind]).reshape(shape))}
    if kind == T.BF16:
        return {"weight": mx.array(np.frombuffer(raw, np.uint16).reshape(shape)).view(mx.bfloat16)}
    if kind in QUANTIZED_BITS:
        return _affine(raw, kind, shape)
    blocks = np.frombuffer(raw, np.uint8).reshape(*shape[:-1], -1)
    return {"weight": mx.array(quants.dequantize(blocks, kind).astype(np.float16).reshape(shape))}


def _pread(fd: int, length: int, offset: int, name: str) -> bytes:
    raw = os.pread(fd, length, offset)
    if len(raw) != length:
        raise ModelError(f"GGUF tensor {name} is cut short: the file is truncated")
    return raw


def _affine(raw: bytes, kind: T, shape: tuple[int, ...]) -> dict[str, mx.array]:
    """Q4_0 / Q4_1 / Q8_0 blocks -> MLX packed weights, scales and biases (w = q * scale + bias)."""
    rows, columns = shape[:-1], shape[-1]
    block_bytes = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34}[kind]
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, block_bytes)  # [blocks, bytes]
    scales = blocks[:, 0:2].copy().view(np.float16)[:, 0]
    if kind == T.Q8_0:  # d, then 32 int8: w = d * q = d * (q + 128) - 128 d
        values = blocks[:, 2:].view(np.int8).astype(np.int16) + 128  # [blocks, 32] in 0..255
        packed = values.astype(np.uint8)
        biases = scales * np.float16(-128)
    else:  # 16 bytes of nibbles: element j in the low nibble of byte j, 16 + j in its high one
        if kind == T.Q4_0:  # d, nibbles: w = d * (q - 8)
            nibbles, biases = blocks[:, 2:], scales * np.float16(-8)
        else:  # Q4_1: d, m, nibbles: w = d * q + m
            nibbles, biases = blocks[:, 4:], blocks[:, 2:4].copy().view(np.float16)[:, 0]
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # [blocks, 32] in order
        packed = values[:, 0::2] | (values[:, 1::2] << 4)  # MLX: consecutive nibbles, low first
    groups = columns // GROUP_SIZE
    return {
        "weight": mx.array(np.ascontiguousarray(packed).reshape(*rows, -1).view(np.uint32)),
        "scales": mx.array(scales.reshape(*rows, groups)),
        "biases": mx.array(biases.reshape(*rows, groups)),
    }
