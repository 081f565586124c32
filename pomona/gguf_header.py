"""Reading a GGUF file's header — metadata and where each tensor lies — without its tensor data.

Our own small reader, shared by the model description and the tokenizer: ``gguf.GGUFReader``
materializes every metadata array and tensor header (seconds for a 49k-entry vocabulary), and
``mx.load`` would pull MLX into the coordinator. Little-endian GGUF v2/v3.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pomona.errors import ModelError

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar; 8 is STRING, 9 is ARRAY.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                   10: "Q", 11: "q", 12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_SKIPPED = object()


@dataclass(frozen=True)
class GgufTensor:
    """Where one tensor lies in the file: read ``nbytes`` from ``offset`` to get its data."""

    name: str
    shape: tuple[int, ...]  # row-major (numpy/MLX) order: GGUF lists ne0 (the row length) first
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    metadata: dict[str, Any]  # arrays are lists, or absent when read with skip_arrays
    tensors: list[GgufTensor]  # in file order

    @property
    def tensor_bytes(self) -> list[tuple[str, int]]:
        """(tensor name, bytes of its data), in file order."""
        return [(t.name, t.nbytes) for t in self.tensors]


class _Cursor:
    def __init__(self, data: mmap.mmap, offset: int) -> None:
        self.data, self.offset = data, offset

    def take(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.take("Q")
        self.offset += length
        return self.data[self.offset - length : self.offset].decode("utf-8", errors="replace")

    def value(self, value_type: int, skip_arrays: bool) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.take("IQ")
            if element_type in _SCALAR_FORMATS:  # one unpack (or one jump) for the whole array
                fmt = f"{count}{_SCALAR_FORMATS[element_type]}"
                if skip_arrays:
                    self.offset += struct.calcsize("<" + fmt)
                    return _SKIPPED
                return list(self.take(fmt))
            values = [self.value(element_type, skip_arrays) for _ in range(count)]
            return _SKIPPED if skip_arrays else values
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.take(fmt)[0]


def read_gguf_header(path: Path, skip_arrays: bool = False) -> GgufHeader:
    """Metadata and tensor sizes of the GGUF file at ``path``; ModelError when it is not one.

    ``skip_arrays`` leaves metadata arrays (the vocabulary, merges) out, for callers that only
    need sizes and scalars.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # lazy: numpy import cost

    try:
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        with data:
            if data[:4] != GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF file")
            cursor = _Cursor(data, 4)
            version, tensor_count, kv_count = cursor.take("IQQ")
            if version not in (2, 3):
                raise ModelError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = cursor.string()
                (value_type,) = cursor.take("I")
                value = cursor.value(value_type, skip_arrays)
                if value is not _SKIPPED:
                    metadata[key] = value
            entries = []
            for _ in range(tensor_count):
                name = cursor.string()
                (dims,) = cursor.take("I")
                shape = cursor.take(f"{dims}Q")
                tensor_type, relative_offset = cursor.take("IQ")
                elements = 1
                for size in shape:
                    elements *= size
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
                entries.append((name, tuple(reversed(shape)), tensor_type, relative_offset,
                                elements // block_size * type_size))  # fmt: skip
            # Tensor data starts at the next multiple of the alignment after the tensor table.
            alignment = int(metadata.get("general.alignment", 32))
            data_start = -(-cursor.offset // alignment) * alignment
            tensors = [GgufTensor(name, shape, kind, data_start + offset, size)
                       for name, shape, kind, offset, size in entries]  # fmt: skip
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise ModelError(f"{path} is not a readable GGUF file (truncated or corrupt: {error})") from None
    return GgufHeader(metadata, tensors)
