"""The serialized graph (``graph.v1``) in either form: where callers encode and decode it (pure).

``core.definition`` holds what both forms share (the model, the JSON form,
the limits and every check on a decoded graph) but may not import the
protobuf library; this module reads and writes the protobuf form with it,
through the module protoc generates from ``api/v1/graph.proto``. Bytes are
protobuf's deterministic serialisation (map entries sorted), so equal graphs
give equal bytes.

Decoding trusts nothing: the byte cap, then the vertex count (before the
library builds a single vertex), then the version, then unknown fields
anywhere (an op type this worker does not know is an unknown ``Op`` field,
refused by number), then each op, its paths and digest (``core.definition``).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as PbMessage

from ociworker.api.v1 import graph_pb2
from ociworker.core.definition import (
    MAX_BYTES,
    MAX_VERTICES,
    OP_KINDS,
    VERSION,
    Definition,
    DefinitionError,
    Format,
    Record,
    build_op,
    check_size,
    check_version,
    decode_json,
    encode_json,
    in_order,
    is_json,
    link,
    op_json,
    read_config,
    too_many,
)
from ociworker.core.digest import canonical_json
from ociworker.core.graph import Vertex

__all__ = [
    "MAX_BYTES",
    "MAX_VERTICES",
    "VERSION",
    "Definition",
    "DefinitionError",
    "Format",
    "decode",
    "encode",
]


# --- encoding ----------------------------------------------------------------------


def _pb_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    # the JSON form writes a host as [name, ip]; the message has named fields
    if kind == "exec" and body.get("extra_hosts"):
        body = dict(body, extra_hosts=[{"name": n, "ip": ip} for n, ip in body["extra_hosts"]])
    return body


def encode(
    target: Vertex | None, image_config: dict[str, Any] | None = None, fmt: Format = "pb"
) -> bytes:
    """The definition of the graph under ``target`` (``fmt``: ``pb``, the
    protobuf document, or ``json``, its canonical JSON form), every vertex
    once, inputs before their users. Equal graphs give equal bytes."""
    if fmt == "json":
        return encode_json(target, image_config)
    if fmt != "pb":
        raise DefinitionError(f"unknown definition format {fmt!r}: want pb or json")
    msg = graph_pb2.Definition(version=VERSION, target=target.digest if target else "")
    for v in in_order(target):
        kind, body = op_json(v)
        try:
            fields: dict[str, Any] = {kind: _pb_body(kind, body)}
            op = graph_pb2.Op(**fields)
        except (ValueError, TypeError) as exc:
            # an op whose JSON holds a field the schema lacks would lose it here
            raise DefinitionError(
                f"op {kind} of {v.name or v.digest}: no {VERSION} form: {exc}"
            ) from None
        msg.vertices.add(
            digest=v.digest,
            name=v.name,
            inputs=[i.digest if i is not None else "" for i in v.inputs],
            ignore_cache=v.ignore_cache,
            op=op,
        )
    if image_config is not None:
        msg.image_config_json = canonical_json(image_config)
    return msg.SerializeToString(deterministic=True)


# --- decoding ----------------------------------------------------------------------


def decode(data: bytes) -> Definition:
    """A definition (either form) as a graph, fully checked."""
    check_size(data)
    if is_json(data):
        return decode_json(data)
    _count_vertices(data)
    msg = graph_pb2.Definition()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise DefinitionError(f"malformed definition: {exc}") from None
    if not msg.version:
        raise DefinitionError("definition has no version (is it a graph.v1 definition?)")
    check_version(msg.version)
    _refuse_unknown_fields(msg, data)
    records = [_record(pv, i) for i, pv in enumerate(msg.vertices)]
    config = read_config(msg.image_config_json) if msg.image_config_json else None
    return Definition(link(records, msg.target), config, msg.version)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7
    return n, len(data)  # truncated: the scan ends and the parser words the error


def _count_vertices(data: bytes) -> None:
    """Refuse more than ``MAX_VERTICES`` vertices before anything is parsed.

    The protobuf library has no way to count a repeated field without making
    every element: an empty Vertex is two bytes, so the byte cap alone lets 33
    million through, which parse into GBs (2.4 GiB measured for the whole
    message, 0.9 GiB with the vertices as bytes). So the top-level tags and
    lengths are walked here, nothing kept. A group (no field of a Definition
    is one) is refused here: the walk cannot skip it, and the parser would
    read on past it; other nonsense ends the walk and the parser refuses it."""
    pos, count = 0, 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            pos += size
            if key >> 3 == 2:
                count += 1
                if count > MAX_VERTICES:
                    raise too_many()
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire in (3, 4):
            raise DefinitionError(f"malformed definition: field {key >> 3} is a group")
        else:
            return


def _refuse_unknown_fields(msg: graph_pb2.Definition, data: bytes) -> None:
    """A field this worker does not know, at any depth (a known number with
    the wrong wire type is one too), is refused: a definition is not half
    understood. Unknown fields are kept in the message and counted in its
    size, so one comparison finds whether there is any; the walk that names
    it runs only then."""
    size = msg.ByteSize()
    msg.DiscardUnknownFields()
    if msg.ByteSize() == size:
        return
    whole = graph_pb2.Definition.FromString(data)
    found = _first_unknown(whole, "definition")
    raise DefinitionError(found or "definition: unknown field")


def _op_numbers() -> str:
    return ", ".join(
        f"{f.number}={f.name}" for f in graph_pb2.Op.DESCRIPTOR.fields if f.name in OP_KINDS
    )


def _first_unknown(msg: PbMessage, where: str) -> str | None:
    """Where the first unknown field is, worded for the user."""
    unknown = unknown_fields.UnknownFieldSet(msg)
    if len(unknown):
        number = unknown[0].field_number
        if msg.DESCRIPTOR is graph_pb2.Op.DESCRIPTOR:
            return (
                f"{where}: unknown op type (Op field {number}; this worker knows {_op_numbers()})"
            )
        return f"{where}: unknown field {number} of {msg.DESCRIPTOR.name}"
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        items = list(enumerate(value)) if fd.is_repeated else [(-1, value)]
        for j, item in items:
            at = f"vertex {j}" if fd.name == "vertices" else f"{where}.{fd.name}"
            if j >= 0 and fd.name != "vertices":
                at += f"[{j}]"
            found = _first_unknown(item, at)
            if found:
                return found
    return None


# How each field of a message becomes a value of its JSON body: the value of
# every field (unset: its zero value), None for a message or a proto3
# optional not set, as the JSON form's builders take them.
_PLAIN, _OPTIONAL, _MESSAGE, _LIST, _MESSAGES, _MAP = range(6)
_PLANS: dict[str, tuple[tuple[str, int], ...]] = {}


def _how(f: FieldDescriptor) -> int:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return _MAP
    if f.is_repeated:
        return _MESSAGES if f.message_type is not None else _LIST
    if f.message_type is not None:
        return _MESSAGE
    return _OPTIONAL if f.has_presence else _PLAIN


def _plan(desc: Any) -> tuple[tuple[str, int], ...]:
    # (``Any``: upb's descriptor type is not the stubs' ``Descriptor``)
    plan = _PLANS.get(desc.full_name)
    if plan is None:
        plan = _PLANS[desc.full_name] = tuple((f.name, _how(f)) for f in desc.fields)
    return plan


def _body(msg: PbMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, how in _plan(msg.DESCRIPTOR):
        value = getattr(msg, name)
        if how == _PLAIN:
            out[name] = value
        elif how == _LIST:
            out[name] = list(value)
        elif how == _MAP:
            out[name] = dict(value)
        elif how == _MESSAGES:
            out[name] = [_body(m) for m in value]
        else:
            out[name] = (_body(value) if how == _MESSAGE else value) if msg.HasField(name) else None
    return out


def _record(pv: graph_pb2.Vertex, index: int) -> Record:
    where = f"vertex {index}"
    kind = pv.op.WhichOneof("op")
    if kind is None:
        raise DefinitionError(f"{where}: no op")
    body = _body(getattr(pv.op, kind))
    if kind == "file":
        body["actions"] = [{k: v for k, v in a.items() if v is not None} for a in body["actions"]]
    return Record(
        pv.digest,
        pv.name,
        tuple(i or None for i in pv.inputs),
        pv.ignore_cache,
        build_op(kind, body, where),
    )
