"""A lean GGUF reader: header, metadata and tensor directory of a memory-mapped file.

``gguf.GGUFReader`` decodes every metadata array element into numpy parts up front; a
tokenizer's 49k tokens and 49k merges make that most of a model's load time. This reader walks
the same layout (GGUF v2 / v3: little-endian header, key/value metadata, tensor infos, aligned
data) but keeps arrays as byte ranges that are decoded only when asked for, and hands tensors
out as zero-copy numpy views of the mapping, shaped like ``GGUFReader``'s (quantized tensors as
``uint8 [rows, row_bytes]``, float tensors in their dtype).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
# GGUF metadata value types -> (struct format, size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass
class Field:
    """One metadata entry; arrays are decoded on first ``contents()``."""

    name: str
    vtype: int
    value: Any = None  # scalars and strings
    item_type: int = -1  # arrays
    count: int = 0
    offset: int = 0  # of the first array item
    _buf: Any = None

    def __len__(self) -> int:
        return self.count if self.vtype == ARRAY else 1

    def contents(self) -> Any:
        if self.vtype != ARRAY:
            return self.value
        if self.value is None:
            if self.item_type == STRING:
                items, off = [], self.offset
                for _ in range(self.count):
                    n = int.from_bytes(self._buf[off : off + 8], "little")
                    items.append(bytes(self._buf[off + 8 : off + 8 + n]).decode("utf-8", errors="replace"))
                    off += 8 + n
                self.value = items
            elif self.item_type in _NUMPY:
                self.value = np.frombuffer(self._buf, dtype=_NUMPY[self.item_type], count=self.count,
                                           offset=self.offset).tolist()
            else:
                raise ValueError(f"GGUF metadata {self.name}: nested arrays are not supported")
        return self.value


@dataclass
class Tensor:
    """A tensor of the file: ``shape`` innermost dimension first (as GGUF stores it)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    n_bytes: int


class GGUFFile:
    """``fields`` (name -> Field) and ``tensors`` (list of Tensor) of a GGUF file."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = str(path)
        self._map = np.memmap(self.path, mode="r")
        buf = memoryview(np.asarray(self._map))  # plain view: fast slicing, still the mapping
        if bytes(buf[:4]) != MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        off = 24
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            name, off = self._string(buf, off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            field, off = self._value(buf, off, name, vtype)
            self.fields[name] = field
        infos = []
        for _ in range(n_tensors):
            name, off = self._string(buf, off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            qtype, data_off = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            infos.append((name, tuple(int(d) for d in dims), GGMLQuantizationType(qtype), data_off))
        align_field = self.fields.get("general.alignment")
        align = int(align_field.value) if align_field is not None else 32
        start = -(-off // align) * align
        self.tensors: list[Tensor] = []
        for name, dims, qtype, data_off in infos:
            elems, type_size = GGML_QUANT_SIZES[qtype]
            rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            if dims[0] % elems:
                raise ValueError(f"GGUF tensor {name}: {dims[0]} columns are not whole {qtype.name} blocks")
            row_bytes = dims[0] // elems * type_size
            n_bytes = rows * row_bytes
            at = start + data_off
            if at + n_bytes > len(self._map):
                raise ValueError(f"GGUF tensor {name} runs past the end of the file (truncated?)")
            shape_np = tuple(reversed(dims))
            typed = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                     "I32": np.int32, "I64": np.int64}  # like GGUFReader: BF16 and blocks stay bytes
            if qtype.name in typed:
                dtype = typed[qtype.name]
                data = np.frombuffer(buf, dtype=dtype, count=n_bytes // type_size, offset=at).reshape(shape_np)
            else:
                data = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=at).reshape(*shape_np[:-1], row_bytes)
            self.tensors.append(Tensor(name, qtype, dims, data, n_bytes))

    @staticmethod
    def _string(buf: memoryview, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, off)
        return bytes(buf[off + 8 : off + 8 + n]).decode("utf-8", errors="replace"), off + 8 + n

    def _value(self, buf: memoryview, off: int, name: str, vtype: int) -> tuple[Field, int]:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return Field(name, vtype, struct.unpack_from(fmt, buf, off)[0]), off + size
        if vtype == STRING:
            value, off = self._string(buf, off)
            return Field(name, vtype, value), off
        if vtype == ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, off)
            off += 12
            field = Field(name, vtype, item_type=item_type, count=count, offset=off, _buf=buf)
            if item_type == STRING:  # walk the lengths to find the end
                for _ in range(count):
                    off += 8 + int.from_bytes(buf[off : off + 8], "little")
            elif item_type in _SCALARS:
                off += _SCALARS[item_type][1] * count
            else:
                raise ValueError(f"GGUF metadata {name}: arrays of type {item_type} are not supported")
            return field, off
        raise ValueError(f"GGUF metadata {name}: unknown value type {vtype}")
