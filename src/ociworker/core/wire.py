"""The protobuf wire format for a fixed schema, in the standard library (pure).

``core`` imports no third-party code, yet the graph definition is a protobuf
message (``api/v1/graph.proto``). This codec reads and writes exactly that
schema: a message is a tuple of ``Field``s, its value a dict keyed by field
name. Bytes are canonical as protoc's deterministic serialisation: fields in
number order, zero values of plain fields left out, map entries sorted by key.
``tests/test_definition.py`` checks the bytes against the generated module.

Decoding is strict: an unknown field number, a wrong wire type or a truncated
value is an error (a definition is refused rather than half understood).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Union

from ociworker.errors import UserError

_VARINT = 0
_LEN = 2

#: a scalar kind, or a nested message's fields
Kind = Union[str, "Message"]


@dataclass(frozen=True)
class Field:
    number: int
    name: str
    #: "string", "bytes", "int" (int64/int32 as varint), "bool", "map" (string ->
    #: string) or a nested Message
    kind: Kind
    #: "one" (zero value left out), "opt" (proto3 optional: None left out) or "rep"
    card: str = "one"


@dataclass(frozen=True)
class Message:
    name: str
    fields: tuple[Field, ...]

    @cached_property
    def by_number(self) -> dict[int, Field]:
        return {f.number: f for f in self.fields}

    @cached_property
    def defaults(self) -> dict[str, Any]:
        """Each plain field's zero value (None for messages and optionals)."""
        return {
            f.name: None if f.card == "opt" or isinstance(f.kind, Message) else _ZERO[f.kind]
            for f in self.fields
            if f.card != "rep" and f.kind != "map"
        }

    @cached_property
    def containers(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The repeated fields' names, and the maps': each decode gives them new ones."""
        reps = tuple(f.name for f in self.fields if f.card == "rep" and f.kind != "map")
        return reps, tuple(f.name for f in self.fields if f.kind == "map")

    @cached_property
    def plan(self) -> tuple[tuple[Field, bytes], ...]:
        """The fields in number order with their key bytes, as encode walks them."""
        return tuple(
            (f, _key(f.number, _VARINT if f.kind in ("int", "bool") else _LEN))
            for f in sorted(self.fields, key=lambda f: f.number)
        )


class WireError(UserError):
    """Bytes that are not a valid message of the schema."""


# --- encoding ------------------------------------------------------------------


_SMALL = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64  # two's complement, as protobuf writes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _scalar(f: Field, key: bytes, value: Any) -> bytes:
    kind = f.kind
    if kind == "string":
        raw = str(value).encode("utf-8")
        return key + _varint(len(raw)) + raw
    if isinstance(kind, Message):
        body = encode(kind, value)
        return key + _varint(len(body)) + body
    if kind == "bytes":
        return key + _varint(len(value)) + bytes(value)
    if kind == "bool":
        return key + (b"\x01" if value else b"\x00")
    if kind == "int":
        return key + _varint(int(value))
    raise ValueError(f"unknown kind {kind!r}")


def _is_zero(f: Field, value: Any) -> bool:
    # a nested message that is set is written even when empty (a oneof's choice)
    return not isinstance(f.kind, Message) and value in ("", b"", 0)


_ENTRY = Message("Entry", (Field(1, "key", "string"), Field(2, "value", "string")))


def encode(msg: Message, value: dict[str, Any]) -> bytes:
    """``value`` (a dict by field name; missing names are unset) as wire bytes."""
    out = bytearray()
    for f, key in msg.plan:
        v = value.get(f.name)
        if v is None:
            continue
        if f.kind == "map":
            for k in sorted(v):
                body = encode(_ENTRY, {"key": k, "value": v[k]})
                out += key + _varint(len(body)) + body
        elif f.card == "rep":
            for item in v:
                out += _scalar(f, key, item)
        elif f.card == "opt" or not _is_zero(f, v):
            out += _scalar(f, key, v)
    return bytes(out)


# --- decoding ------------------------------------------------------------------


def _read_varint(data: bytes | memoryview, pos: int, where: str) -> tuple[int, int]:
    if pos < len(data) and data[pos] < 0x80:  # most keys and lengths: one byte
        return data[pos], pos + 1
    n = shift = 0
    while True:
        if pos >= len(data):
            raise WireError(f"{where}: truncated varint")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"{where}: varint too long")


def fields(data: bytes | memoryview, where: str) -> Iterator[tuple[int, int, Any]]:
    """Each ``(number, wire type, value)`` of a message, one at a time: a caller
    counting a repeated field stops before the rest is parsed."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        key, pos = _read_varint(view, pos, where)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(view, pos, where)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _read_varint(view, pos, where)
            if pos + size > len(view):
                raise WireError(f"{where}: field {number} runs past the end of its message")
            yield number, wire, view[pos : pos + size]
            pos += size
        else:
            raise WireError(f"{where}: field {number} has unsupported wire type {wire}")


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


_ZERO: dict[str, Any] = {"string": "", "bytes": b"", "int": 0, "bool": False}


def empty(msg: Message) -> dict[str, Any]:
    """The value of a message with no field set (protobuf's defaults)."""
    out = dict(msg.defaults)
    for name in msg.containers[0]:
        out[name] = []
    for name in msg.containers[1]:
        out[name] = {}
    return out


def decode(
    msg: Message,
    data: bytes | memoryview,
    where: str = "",
    unknown: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """Wire bytes as a dict by field name (every field present, unset ones at
    their default). An unknown field is refused: ``unknown(number)`` words the
    error (default: the field's number and the message's name)."""
    where = where or msg.name
    table = msg.by_number
    out = empty(msg)
    for number, wire, value in fields(data, where):
        f = table.get(number)
        if f is None:
            raise WireError(unknown(number) if unknown else f"{where}: unknown field {number}")
        kind = f.kind
        if wire != (_VARINT if kind == "int" or kind == "bool" else _LEN):
            raise WireError(f"{where}.{f.name}: wrong wire type {wire}")
        if kind == "string":
            try:
                item: Any = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise WireError(f"{where}.{f.name}: a string field is not UTF-8") from None
        elif kind == "map":
            entry = decode(_ENTRY, value, f"{where}.{f.name}")
            out[f.name][entry["key"]] = entry["value"]
            continue
        elif isinstance(kind, Message):
            item = decode(kind, value, f"{where}.{f.name}")
        elif kind == "bytes":
            item = bytes(value)
        elif kind == "bool":
            item = bool(value)
        else:
            item = _signed(value)
        if f.card == "rep":
            out[f.name].append(item)
        else:
            out[f.name] = item
    return out
