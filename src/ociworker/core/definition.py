"""The serialized graph (``graph.v1``): a build graph as a versioned document (pure).

Two forms of one document: protobuf (``api/v1/graph.proto``, written by
``core.wire``) and canonical JSON for reading (sorted keys, stable order).
Each vertex carries the digest the worker computes for it (``Vertex.digest``:
its op's JSON and its inputs' digests), so a definition is content-addressed
the way the worker is: ``decode(encode(v)).target.digest == v.digest``, and
a vertex whose stated digest is not what its op and inputs make is refused.

Nothing in a definition is trusted: ``decode`` checks the version, the size
(bytes and vertex count, before the vertices are parsed), every op type and
field, dangling inputs, cycles, input indexes and ``..`` in file-op paths, and
raises ``DefinitionError`` naming what is wrong before anything can run.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ociworker.core.build import Ulimit
from ociworker.core.digest import canonical_json, is_digest
from ociworker.core.graph import (
    Copy,
    DiffOp,
    ExecMount,
    ExecOp,
    FileAction,
    FileOp,
    HttpSourceOp,
    MergeOp,
    Mkdir,
    Mkfile,
    OpSpec,
    Rm,
    SourceOp,
    Vertex,
)
from ociworker.core.wire import Field, Message, WireError, fields
from ociworker.core.wire import decode as wire_decode
from ociworker.core.wire import encode as wire_encode
from ociworker.errors import OciworkerError, UserError

VERSION = "graph.v1"
#: a definition larger than this is refused unread (heredocs make big mkfiles)
MAX_BYTES = 64 << 20
#: more vertices than this are refused as soon as the count is passed
MAX_VERTICES = 100_000

Format = Literal["pb", "json"]


class DefinitionError(UserError):
    """A graph definition that is malformed, hostile or of an unknown version."""


@dataclass(frozen=True)
class Definition:
    """A decoded definition: the graph's target (None: an empty filesystem)
    and the image config it asks for (None: none given)."""

    target: Vertex | None
    image_config: dict[str, Any] | None = None
    version: str = VERSION


# --- the schema (api/v1/graph.proto, field for field) ------------------------------

_S, _I, _B, _M = "string", "int", "bool", "map"

SOURCE = Message("SourceOp", (Field(1, "identifier", _S), Field(2, "attrs", _M)))
HTTP = Message("HttpOp", (Field(1, "url", _S), Field(2, "checksum", _S), Field(3, "filename", _S)))
MOUNT = Message(
    "ExecMount",
    (
        Field(1, "target", _S),
        Field(2, "type", _S),
        Field(3, "input", _I),
        Field(4, "selector", _S),
        Field(5, "readonly", _B),
        Field(6, "options", _M),
    ),
)
HOST = Message("HostIP", (Field(1, "name", _S), Field(2, "ip", _S)))
EXEC = Message(
    "ExecOp",
    (
        Field(1, "args", _S, "rep"),
        Field(2, "env", _S, "rep"),
        Field(3, "cwd", _S),
        Field(4, "user", _S),
        Field(5, "network", _S),
        Field(6, "hostname", _S),
        Field(7, "mounts", MOUNT, "rep"),
        Field(8, "ulimits", _S, "rep"),
        Field(9, "shm_size", _I),
        Field(10, "security", _S),
        Field(11, "extra_hosts", HOST, "rep"),
    ),
)
COPY = Message(
    "Copy",
    (
        Field(1, "src_input", _I),
        Field(2, "src", _S),
        Field(3, "dest", _S),
        Field(4, "chown", _S),
        Field(5, "chmod", _I, "opt"),
        Field(6, "follow_symlinks", _B),
        Field(7, "allow_wildcard", _B),
        Field(8, "allow_empty_wildcard", _B),
        Field(9, "create_dest_path", _B),
        Field(10, "dir_contents_only", _B),
        Field(11, "dest_is_dir", _B),
        Field(12, "exclude", _S, "rep"),
        Field(13, "unpack_archive", _B),
        Field(14, "parents", _B),
        Field(15, "chmod_symbolic", _S),
        Field(16, "multi_source", _B),
    ),
)
MKDIR = Message(
    "Mkdir",
    (
        Field(1, "path", _S),
        Field(2, "mode", _I),
        Field(3, "make_parents", _B),
        Field(4, "chown", _S),
    ),
)
MKFILE = Message(
    "Mkfile",
    (Field(1, "path", _S), Field(2, "data", _S), Field(3, "mode", _I), Field(4, "chown", _S)),
)
RM = Message(
    "Rm", (Field(1, "path", _S), Field(2, "allow_not_found", _B), Field(3, "allow_wildcard", _B))
)
ACTION = Message(
    "FileAction",
    (
        Field(1, "copy", COPY),
        Field(2, "mkdir", MKDIR),
        Field(3, "mkfile", MKFILE),
        Field(4, "rm", RM),
    ),
)
FILE = Message("FileOp", (Field(1, "actions", ACTION, "rep"), Field(2, "cwd", _S)))


@dataclass(frozen=True)
class OpKind:
    """One op type of the format: its oneof field in ``Op``, its message, and
    how its JSON body (``op.to_json()[name]``) becomes the op again."""

    number: int
    message: Message
    build: Callable[[dict[str, Any]], OpSpec]


def _exec(b: dict[str, Any]) -> OpSpec:
    return ExecOp(
        args=tuple(b["args"]),
        env=tuple(b.get("env") or ()),
        cwd=b.get("cwd", "/"),
        user=b.get("user", ""),
        network=b.get("network", "default"),
        hostname=b.get("hostname", ""),
        mounts=tuple(
            ExecMount(
                target=m.get("target", ""),
                type=m.get("type", "bind"),
                input=m.get("input", -1),
                selector=m.get("selector", "/"),
                readonly=m.get("readonly", True),
                options=tuple(sorted((m.get("options") or {}).items())),
            )
            for m in b.get("mounts") or ()
        ),
        ulimits=tuple(Ulimit.parse(u) for u in b.get("ulimits") or ()),
        shm_size=b.get("shm_size") or 0,
        # to_json leaves the defaults out (the keys of older steps stay as they were)
        security=b.get("security") or "sandbox",
        extra_hosts=tuple(
            (h["name"], h["ip"]) if isinstance(h, dict) else (h[0], h[1])
            for h in b.get("extra_hosts") or ()
        ),
    )


def _copy(b: dict[str, Any]) -> Copy:
    known = {f.name for f in COPY.fields}
    args = {k: v for k, v in b.items() if k in known}
    args["exclude"] = tuple(args.get("exclude") or ())
    return Copy(**args)


_ACTIONS: Mapping[str, Callable[[dict[str, Any]], FileAction]] = {
    "copy": _copy,
    "mkdir": lambda b: Mkdir(**b),
    "mkfile": lambda b: Mkfile(**b),
    "rm": lambda b: Rm(**b),
}


def _file(b: dict[str, Any]) -> OpSpec:
    actions: list[FileAction] = []
    for a in b.get("actions") or ():
        chosen = [(k, v) for k, v in a.items() if v is not None]
        if len(chosen) != 1 or chosen[0][0] not in _ACTIONS:
            raise DefinitionError(f"a file action is exactly one of {', '.join(_ACTIONS)}")
        name, body = chosen[0]
        actions.append(_ACTIONS[name](body))
    return FileOp(tuple(actions), cwd=b.get("cwd", "/"))


#: op types by their JSON name (merge and diff: BuildKit's MergeOp and DiffOp,
#: bodies with no fields: all they say is in their inputs)
OP_KINDS: dict[str, OpKind] = {
    "source": OpKind(
        1,
        SOURCE,
        lambda b: SourceOp(b["identifier"], tuple(sorted((b.get("attrs") or {}).items()))),
    ),
    "http": OpKind(2, HTTP, lambda b: HttpSourceOp(**b)),
    "exec": OpKind(3, EXEC, _exec),
    "file": OpKind(4, FILE, _file),
    "merge": OpKind(5, Message("MergeOp", ()), lambda b: MergeOp()),
    "diff": OpKind(6, Message("DiffOp", ()), lambda b: DiffOp()),
}


def _op_message() -> Message:
    return Message("Op", tuple(Field(k.number, n, k.message) for n, k in OP_KINDS.items()))


VERTEX_FIELDS = (
    Field(1, "digest", _S),
    Field(2, "name", _S),
    Field(3, "inputs", _S, "rep"),
    Field(4, "ignore_cache", _B),
)


#: a Vertex with its op left as bytes (read apart, see ``_pb_vertex``)
_VERTEX_RAW_OP = Message("Vertex", (*VERTEX_FIELDS, Field(5, "op", "bytes")))


def _vertex_message() -> Message:
    return Message("Vertex", (*VERTEX_FIELDS, Field(5, "op", _op_message())))


# --- encoding ----------------------------------------------------------------------


def _op_json(v: Vertex) -> tuple[str, dict[str, Any]]:
    body = v.op.to_json()
    if len(body) != 1 or next(iter(body)) not in OP_KINDS:
        raise DefinitionError(
            f"op type {type(v.op).__name__} ({', '.join(body)}) has no {VERSION} form "
            f"(known: {', '.join(OP_KINDS)})"
        )
    kind, inner = next(iter(body.items()))
    return kind, inner


def _wire_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    if kind == "exec" and body.get("extra_hosts"):
        body = dict(body, extra_hosts=[{"name": n, "ip": ip} for n, ip in body["extra_hosts"]])
    return body


def _digest_bottom_up(target: Vertex) -> None:
    """Compute every digest inputs first: ``Vertex.digest`` asks its inputs'
    recursively, which a chain of thousands of steps would take past
    Python's recursion limit; each one cached, no call goes deep."""
    done: set[int] = set()
    stack: list[tuple[Vertex, bool]] = [(target, False)]
    while stack:
        v, ready = stack.pop()
        if id(v) in done:
            continue
        if ready:
            _ = v.digest
            done.add(id(v))
            continue
        stack.append((v, True))
        stack.extend((i, False) for i in v.inputs if i is not None and id(i) not in done)


def encode(
    target: Vertex | None, image_config: dict[str, Any] | None = None, fmt: Format = "pb"
) -> bytes:
    """The definition of the graph under ``target``, every vertex once, inputs
    before their users. Equal graphs give equal bytes."""
    if target is not None:
        _digest_bottom_up(target)
    vertices = list(target.walk()) if target is not None else []
    if fmt == "json":
        doc: dict[str, Any] = {
            "version": VERSION,
            "target": target.digest if target is not None else "",
            "vertices": [
                {
                    "digest": v.digest,
                    "name": v.name,
                    "inputs": [i.digest if i is not None else None for i in v.inputs],
                    "op": dict([_op_json(v)]),
                    **({"ignore_cache": True} if v.ignore_cache else {}),
                }
                for v in vertices
            ],
        }
        if image_config is not None:
            doc["image_config"] = image_config
        text = json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False)
        return text.encode() + b"\n"
    if fmt != "pb":
        raise DefinitionError(f"unknown definition format {fmt!r}: want pb or json")
    vmsg = _vertex_message()
    one = Message("Definition", (Field(2, "v", vmsg),))
    out = bytearray(wire_encode(Message("V", (Field(1, "version", _S),)), {"version": VERSION}))
    for v in vertices:
        kind, body = _op_json(v)
        record = {
            "digest": v.digest,
            "name": v.name,
            "inputs": [i.digest if i is not None else "" for i in v.inputs],
            "ignore_cache": v.ignore_cache,
            "op": {kind: _wire_body(kind, body)},
        }
        out += wire_encode(one, {"v": record})
    rest: dict[str, Any] = {"target": target.digest if target is not None else "", "config": None}
    if image_config is not None:
        rest["config"] = canonical_json(image_config)
    out += wire_encode(Message("D", (Field(3, "target", _S), Field(4, "config", "bytes"))), rest)
    return bytes(out)


# --- decoding ----------------------------------------------------------------------


@dataclass
class _Raw:
    digest: str
    name: str
    inputs: list[str | None]
    ignore_cache: bool
    op: OpSpec


def decode(data: bytes) -> Definition:
    """A definition (either form) as a graph, fully checked."""
    if len(data) > MAX_BYTES:
        raise DefinitionError(
            f"definition of {len(data)} bytes is over the limit of {MAX_BYTES} bytes"
        )
    head = data.lstrip()[:1]
    if head in (b"{", b"["):  # no protobuf Definition starts so (field 15, 11: groups)
        version, raws, target, config = _read_json(data)
    else:
        version, raws, target, config = _read_pb(data)
    return Definition(_link(raws, target), config, version)


def _check_version(version: str) -> None:
    if version != VERSION:
        raise DefinitionError(
            f"unsupported definition version {version!r}: this worker reads {VERSION}"
        )


def _too_many() -> DefinitionError:
    return DefinitionError(f"definition has more than {MAX_VERTICES} vertices")


def _read_pb(data: bytes) -> tuple[str, list[_Raw], str, dict[str, Any] | None]:
    vmsg = _vertex_message()
    version: str | None = None
    target = ""
    config: dict[str, Any] | None = None
    raws: list[_Raw] = []
    kinds = {k.number: n for n, k in OP_KINDS.items()}
    try:
        # counted before any vertex is parsed: a huge graph is refused in O(1) memory
        count = 0
        for number, _wire, _value in fields(data, "Definition"):
            count += number == 2
            if count > MAX_VERTICES:
                raise _too_many()
        for number, wire, value in fields(data, "Definition"):
            if number == 1 and wire == 2:
                version = bytes(value).decode("utf-8", "replace")
                _check_version(version)
            elif number == 2 and wire == 2:
                if version is None:
                    raise DefinitionError("definition does not start with its version")
                if len(raws) >= MAX_VERTICES:
                    raise _too_many()
                raws.append(_pb_vertex(vmsg, value, len(raws), kinds))
            elif number == 3 and wire == 2:
                target = bytes(value).decode("utf-8", "replace")
            elif number == 4 and wire == 2:
                config = _config(bytes(value))
            else:
                raise DefinitionError(f"definition: unknown field {number}")
    except WireError as exc:
        raise DefinitionError(f"malformed definition: {exc}") from None
    if version is None:
        raise DefinitionError("definition has no version (is it a graph.v1 definition?)")
    return version, raws, target, config


def _pb_vertex(vmsg: Message, value: Any, index: int, kinds: dict[int, str]) -> _Raw:
    where = f"vertex {index}"
    # the op is read apart so that an unknown op type is refused by its number
    rec = wire_decode(_VERTEX_RAW_OP, value, where)
    name = ""
    body: dict[str, Any] | None = None
    for number, _wire, raw in fields(rec["op"] or b"", f"{where} op"):
        if number not in kinds or body is not None:
            raise DefinitionError(
                f"{where}: unknown op type (Op field {number}; this worker knows "
                f"{', '.join(f'{n}={k}' for k, n in kinds.items())})"
            )
        name = kinds[number]
        body = wire_decode(OP_KINDS[name].message, raw, f"{where} {name}")
    if body is None:
        raise DefinitionError(f"{where}: no op")
    if name == "file":
        body["actions"] = [{k: v for k, v in a.items() if v is not None} for a in body["actions"]]
    return _Raw(
        rec["digest"],
        rec["name"],
        [i or None for i in rec["inputs"]],
        rec["ignore_cache"],
        _build(name, body, where),
    )


def _build(kind: str, body: dict[str, Any], where: str) -> OpSpec:
    try:
        return OP_KINDS[kind].build(body)
    except OciworkerError as exc:
        raise DefinitionError(f"{where} ({kind}): {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise DefinitionError(f"{where} ({kind}): invalid op: {exc}") from None


def _config(raw: bytes) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise DefinitionError(f"image config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise DefinitionError("image config is not a JSON object")
    return config


def _count_json_vertices(text: str) -> None:
    """Refuse a JSON definition with too many vertices before it is loaded:
    each element of its top-level ``vertices`` is decoded alone and dropped,
    so the count costs one vertex's memory."""
    dec = json.JSONDecoder()

    def ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = ws(0)
    if text[i : i + 1] != "{":
        return  # not an object: json.loads words the error
    i = ws(i + 1)
    while i < len(text) and text[i] != "}":
        key, i = dec.raw_decode(text, i)
        i = ws(i)
        if text[i : i + 1] != ":":
            return
        i = ws(i + 1)
        if key == "vertices" and text[i : i + 1] == "[":
            i, count = ws(i + 1), 0
            while i < len(text) and text[i] != "]":
                _, i = dec.raw_decode(text, i)
                count += 1
                if count > MAX_VERTICES:
                    raise _too_many()
                i = ws(i)
                i = ws(i + 1) if text[i : i + 1] == "," else i
            i += 1
        else:
            _, i = dec.raw_decode(text, i)
        i = ws(i)
        i = ws(i + 1) if text[i : i + 1] == "," else i


def _read_json(data: bytes) -> tuple[str, list[_Raw], str, dict[str, Any] | None]:
    try:
        text = data.decode("utf-8")
        _count_json_vertices(text)
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DefinitionError(f"malformed JSON definition: {exc}") from None
    if not isinstance(doc, dict):
        raise DefinitionError("a JSON definition is an object")
    unknown = set(doc) - {"version", "vertices", "target", "image_config"}
    if unknown:
        raise DefinitionError(f"definition: unknown field {sorted(unknown)[0]!r}")
    version = doc.get("version")
    if not isinstance(version, str):
        raise DefinitionError("definition has no version (is it a graph.v1 definition?)")
    _check_version(version)
    vertices = doc.get("vertices") or []
    if not isinstance(vertices, list):
        raise DefinitionError("definition: vertices is not a list")
    if len(vertices) > MAX_VERTICES:
        raise _too_many()
    raws = [_json_vertex(v, i) for i, v in enumerate(vertices)]
    target = doc.get("target") or ""
    config = doc.get("image_config")
    if config is not None and not isinstance(config, dict):
        raise DefinitionError("image config is not a JSON object")
    if not isinstance(target, str):
        raise DefinitionError("definition: target is not a digest")
    return version, raws, target, config


def _json_vertex(v: Any, index: int) -> _Raw:
    where = f"vertex {index}"
    if not isinstance(v, dict):
        raise DefinitionError(f"{where}: not an object")
    unknown = set(v) - {"digest", "name", "inputs", "op", "ignore_cache"}
    if unknown:
        raise DefinitionError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    op = v.get("op")
    if not isinstance(op, dict) or len(op) != 1:
        raise DefinitionError(f"{where}: op must be an object with one op type")
    kind, body = next(iter(op.items()))
    if kind not in OP_KINDS:
        raise DefinitionError(
            f"{where}: unknown op type {kind!r} (this worker knows {', '.join(OP_KINDS)})"
        )
    _check_json(OP_KINDS[kind].message, body, f"{where} {kind}")
    inputs = v.get("inputs") or []
    if not isinstance(inputs, list) or not all(i is None or isinstance(i, str) for i in inputs):
        raise DefinitionError(f"{where}: inputs must be a list of digests (null: scratch)")
    name, digest = v.get("name", ""), v.get("digest", "")
    if not isinstance(name, str) or not isinstance(digest, str):
        raise DefinitionError(f"{where}: digest and name are strings")
    return _Raw(digest, name, list(inputs), bool(v.get("ignore_cache")), _build(kind, body, where))


_JSON_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,),
    "bytes": (str,),
    "int": (int,),
    "bool": (bool,),
}


def _check_json(msg: Message, value: Any, where: str) -> None:
    """The JSON body has the schema's fields and types (so a bad one is named
    here, not met later by the op's handler)."""
    if not isinstance(value, dict):
        raise DefinitionError(f"{where}: not an object")
    table = {f.name: f for f in msg.fields}
    for key, item in value.items():
        f = table.get(key)
        if f is None:
            raise DefinitionError(f"{where}: unknown field {key!r}")
        at = f"{where}.{key}"
        if item is None and f.card == "opt":
            continue
        if f.kind == "map":
            if not isinstance(item, dict) or not all(
                isinstance(k, str) and isinstance(x, str) for k, x in item.items()
            ):
                raise DefinitionError(f"{at}: want an object of strings")
            continue
        items = item if f.card == "rep" else [item]
        if f.card == "rep" and not isinstance(item, list):
            raise DefinitionError(f"{at}: want a list")
        for x in items:
            if isinstance(f.kind, Message):
                if f.kind is HOST and isinstance(x, list):
                    if len(x) != 2 or not all(isinstance(s, str) for s in x):
                        raise DefinitionError(f"{at}: want [name, ip]")
                    continue
                _check_json(f.kind, x, at)
                continue
            want = _JSON_TYPES[str(f.kind)]
            if not isinstance(x, want) or (f.kind == "int" and isinstance(x, bool)):
                raise DefinitionError(f"{at}: want a {f.kind}")


# --- linking and checking ----------------------------------------------------------


def _link(raws: list[_Raw], target: str) -> Vertex | None:
    """The graph the records describe: every input defined, no cycle, each
    vertex's stated digest the one its op and inputs make."""
    index: dict[str, int] = {}
    for i, r in enumerate(raws):
        if not is_digest(r.digest):
            raise DefinitionError(
                f"vertex {i} ({r.name or 'unnamed'}): invalid digest {r.digest!r}"
            )
        if r.digest in index:
            raise DefinitionError(f"vertex {i}: digest {r.digest} is defined twice")
        index[r.digest] = i
        _check_op(r.op, len(r.inputs), f"vertex {i} ({r.name or r.digest})")
    if target and target not in index:
        raise DefinitionError(f"target {target} is not a vertex of the definition")
    built: list[Vertex | None] = [None] * len(raws)
    state = [0] * len(raws)  # 0 new, 1 on the path (its inputs being built), 2 done
    for start in range(len(raws)):
        if state[start]:
            continue
        stack = [start]
        while stack:  # iterative: a chain of 10^5 vertices must not hit the recursion limit
            i = stack[-1]
            r = raws[i]
            if state[i] == 0:
                state[i] = 1
                for n, d in enumerate(r.inputs):
                    if d is None:
                        continue
                    j = index.get(d)
                    if j is None:
                        raise DefinitionError(
                            f"vertex {i} ({r.name or r.digest}): input {n} names {d}, "
                            "which the definition does not define"
                        )
                    if state[j] == 1:
                        raise DefinitionError(
                            f"cycle: vertex {i} ({r.name or r.digest}) depends on itself "
                            f"through vertex {j} ({raws[j].name or raws[j].digest})"
                        )
                    if state[j] == 0:
                        stack.append(j)
                continue
            stack.pop()
            if state[i] == 2:
                continue
            inputs = tuple(built[index[d]] if d is not None else None for d in r.inputs)
            v = Vertex(r.op, inputs, name=r.name, ignore_cache=r.ignore_cache)
            if v.digest != r.digest:
                raise DefinitionError(
                    f"vertex {i} ({r.name or 'unnamed'}): stated digest {r.digest} is not "
                    f"its content's ({v.digest})"
                )
            built[i] = v
            state[i] = 2
    return built[index[target]] if target else None


def _check_path(path: str, where: str) -> None:
    if "\x00" in path:
        raise DefinitionError(f"{where}: NUL in path {path!r}")
    if ".." in path.split("/"):
        raise DefinitionError(f"{where}: path {path!r} escapes its root (..)")


#: what the exec handler knows (anything else would fail mid-build, or worse)
_NETWORKS = ("default", "none", "host")
_SECURITY = ("sandbox", "insecure")
_MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")


def _check_mode(mode: int | None, where: str) -> None:
    if mode is not None and not 0 <= mode <= 0o7777:
        raise DefinitionError(f"{where}: file mode {mode} is not a permission mode (0 to 0o7777)")


def _check_op(op: OpSpec, n_inputs: int, where: str) -> None:
    """What the op's handler takes for granted, checked before anything runs."""
    if isinstance(op, FileOp):
        _check_path(op.cwd, where)
        for a in op.actions:
            if isinstance(a, Copy):
                _check_path(a.src, where)
                _check_path(a.dest, where)
                _check_mode(a.chmod, where)
                if not 0 <= a.src_input < n_inputs:
                    raise DefinitionError(f"{where}: copy from input {a.src_input} of {n_inputs}")
            else:
                _check_path(a.path, where)
                if isinstance(a, Mkdir | Mkfile):
                    _check_mode(a.mode, where)
    elif isinstance(op, DiffOp):
        if n_inputs != 2:
            raise DefinitionError(f"{where}: diff takes 2 inputs (lower, upper), not {n_inputs}")
    elif isinstance(op, MergeOp):
        if n_inputs < 1:
            raise DefinitionError(f"{where}: merge without inputs")
    elif isinstance(op, ExecOp):
        if not op.args:
            raise DefinitionError(f"{where}: exec without a command")
        if op.network not in _NETWORKS:
            raise DefinitionError(f"{where}: network {op.network!r} is not one of {_NETWORKS}")
        if op.security not in _SECURITY:
            raise DefinitionError(f"{where}: security {op.security!r} is not one of {_SECURITY}")
        if op.shm_size < 0:
            raise DefinitionError(f"{where}: negative shm_size")
        for m in op.mounts:
            if m.type not in _MOUNT_TYPES:
                raise DefinitionError(
                    f"{where}: mount type {m.type!r} is not one of {_MOUNT_TYPES}"
                )
            if m.input >= n_inputs or m.input < -1:
                raise DefinitionError(f"{where}: mount {m.target} of input {m.input} of {n_inputs}")
            if not posixpath.isabs(m.target):
                raise DefinitionError(f"{where}: mount target {m.target!r} is not absolute")
            _check_path(m.target, where)
            _check_path(m.selector, where)
