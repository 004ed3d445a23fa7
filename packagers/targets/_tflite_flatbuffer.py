"""The few facts edgeship reads from a ``.tflite`` flatbuffer, without the flatbuffers package or TensorFlow.

Field numbers from tensorflow/compiler/mlir/lite/schema/schema.fbs: ``Model`` {0 version, 1 operator_codes,
4 buffers, 6 metadata}, ``OperatorCode`` {0 deprecated_builtin_code, 1 custom_code, 2 version,
3 builtin_code}, ``Metadata`` {0 name, 1 buffer}, ``Buffer`` {0 data}.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TfLiteFacts", "read_facts"]


@dataclass(frozen=True)
class TfLiteFacts:
    schema_version: int
    operators: tuple[tuple[int, int, str | None], ...]  # (builtin code, op version, custom code)
    metadata: dict[str, bytes]

    @property
    def min_runtime_version(self) -> str | None:
        raw = self.metadata.get("min_runtime_version")
        text = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip() if raw else ""
        return text or None


def _table(b: bytes, pos: int) -> Callable[[int], int | None]:
    vtable = pos - struct.unpack_from("<i", b, pos)[0]
    size = struct.unpack_from("<H", b, vtable)[0]

    def field(i: int) -> int | None:
        at = 4 + 2 * i
        if at >= size:
            return None
        offset = struct.unpack_from("<H", b, vtable + at)[0]
        return pos + offset if offset else None

    return field


def _ref(b: bytes, at: int) -> int:
    return at + struct.unpack_from("<I", b, at)[0]


def _vector(b: bytes, at: int) -> tuple[int, int]:
    start = _ref(b, at)
    return start + 4, struct.unpack_from("<I", b, start)[0]


def _string(b: bytes, at: int) -> str:
    start, n = _vector(b, at)
    return b[start : start + n].decode("utf-8", "replace")


def read_facts(b: bytes) -> TfLiteFacts:
    """Schema version, operator codes and metadata of a .tflite model.

    Raises:
        ValueError: not a readable TFLite flatbuffer (``struct.error`` and index errors are converted).
    """
    try:
        model = _table(b, struct.unpack_from("<I", b, 0)[0])
        at = model(0)
        schema = struct.unpack_from("<I", b, at)[0] if at else 0
        ops: list[tuple[int, int, str | None]] = []
        if (at := model(1)) is not None:
            start, n = _vector(b, at)
            for k in range(n):
                code = _table(b, _ref(b, start + 4 * k))
                deprecated = struct.unpack_from("<b", b, f)[0] if (f := code(0)) else 0
                builtin = struct.unpack_from("<i", b, f)[0] if (f := code(3)) else 0
                version = struct.unpack_from("<i", b, f)[0] if (f := code(2)) else 1
                custom = _string(b, f) if (f := code(1)) else None
                ops.append((max(deprecated, builtin), version, custom))
        metadata: dict[str, bytes] = {}
        if (at := model(6)) is not None and (buffers_at := model(4)) is not None:
            buffers, _ = _vector(b, buffers_at)
            start, n = _vector(b, at)
            for k in range(n):
                entry = _table(b, _ref(b, start + 4 * k))
                name_at, index_at = entry(0), entry(1)
                if name_at is None:
                    continue
                index = struct.unpack_from("<I", b, index_at)[0] if index_at else 0
                buffer = _table(b, _ref(b, buffers + 4 * index))
                data = b""
                if (data_at := buffer(0)) is not None:
                    d, dn = _vector(b, data_at)
                    data = b[d : d + dn]
                metadata[_string(b, name_at)] = data
    except (struct.error, IndexError) as e:
        raise ValueError(f"not a readable TFLite flatbuffer: {e}") from e
    return TfLiteFacts(schema, tuple(ops), metadata)
