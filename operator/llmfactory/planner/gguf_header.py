"""A GGUF file's header as the planner needs it: its scalar metadata, the length of each array (a
vocabulary's size) and the names of its tensors. gguf's GGUFReader builds a NumPy view of every
part of every field, each of a vocabulary's ~50k-150k tokens and merges among them: ~2.3 s for
SmolLM2-135M's file, where skipping the arrays takes milliseconds.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (version 2 and later)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

# Value types: their struct format; 8 is a string, 9 an array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Header:
    values: dict[str, object]  # scalars and strings; a number array's first item (per-layer head counts)
    lengths: dict[str, int]  # arrays: how many items
    tensors: list[str]


class _Cursor:
    def __init__(self, data: mmap.mmap, endian: str):
        self.data, self.endian, self.at = data, endian, 0

    def peek(self, fmt: str):
        return struct.unpack_from(self.endian + fmt, self.data, self.at)[0]

    def take(self, fmt: str):
        value = self.peek(fmt)
        self.at += struct.calcsize(self.endian + fmt)
        return value

    def string(self) -> str:
        size = self.take("Q")
        self.at += size
        return self.data[self.at - size:self.at].decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind not in SCALARS and kind != STRING:
            raise _UnknownType(kind)
        return self.string() if kind == STRING else self.take(SCALARS[kind])

    def skip_array(self, item: int, count: int) -> None:
        if item == STRING:
            for _ in range(count):
                self.at += 8 + self.peek("Q")
        elif item == ARRAY:
            for _ in range(count):
                inner = self.take("I")
                self.skip_array(inner, self.take("Q"))
        elif item in SCALARS:
            self.at += count * struct.calcsize(self.endian + SCALARS[item])
        else:
            raise _UnknownType(item)


class _UnknownType(Exception):
    """A value type after those of GGUF version 3."""


def read_header(path: Path) -> Header | None:
    """The header of the GGUF file at path, little- or big-endian; None for a version 1 file (of
    2023) or a value type after version 3's (the runtime reads them, and checks the memory then);
    ValueError when it is not a GGUF file."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _header(data)
            except _UnknownType:
                return None
            except struct.error:
                raise ValueError(f"{path.name} ends inside its GGUF header (a partial download?)") from None


def _header(data: mmap.mmap) -> Header | None:
    # A big-endian file's version reads as a huge number in little-endian order.
    endian = "<" if struct.unpack_from("<I", data, 4)[0] <= 0xFFFF else ">"
    cursor = _Cursor(data, endian)
    cursor.at = 4
    if cursor.take("I") < 2:
        return None
    tensor_count, field_count = cursor.take("Q"), cursor.take("Q")
    values, lengths = {}, {}
    for _ in range(field_count):
        key, kind = cursor.string(), cursor.take("I")
        if kind != ARRAY:
            values[key] = cursor.value(kind)
            continue
        item, count = cursor.take("I"), cursor.take("Q")
        lengths[key] = count
        if item in SCALARS and count:
            values[key] = cursor.peek(SCALARS[item])
        cursor.skip_array(item, count)
    tensors = []
    for _ in range(tensor_count):
        tensors.append(cursor.string())
        dimensions = cursor.take("I")
        cursor.at += 8 * dimensions + 4 + 8  # the dimensions, type, offset
    return Header(values, lengths, tensors)
