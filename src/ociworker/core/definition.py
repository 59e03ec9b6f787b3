"""The serialized graph (``graph.v1``): a build graph as a versioned document (pure).

Two forms of one document: protobuf (``api/v1/graph.proto``, read and written
by ``ociworker.definition`` with the protobuf library, which core may not
import) and canonical JSON for reading (sorted keys, stable order), which is
here with the model both forms share and every check made on a decoded graph.
Each vertex carries the digest the worker computes for it (``Vertex.digest``:
its op's JSON and its inputs' digests), so a definition is content-addressed
the way the worker is: ``decode(encode(v)).target.digest == v.digest``, and
a vertex whose stated digest is not what its op and inputs make is refused.

Nothing in a definition is trusted: decoding checks the version, the size
(bytes and vertex count, before the vertices are parsed), every op type and
field, dangling inputs, cycles, input indexes and ``..`` in file-op paths, and
raises ``DefinitionError`` naming what is wrong before anything can run.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ociworker.core.build import Ulimit
from ociworker.core.digest import is_digest
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


# --- the schema of the op bodies (api/v1/graph.proto's op messages) -----------------
#
# What a JSON body may hold, field for field as the protobuf messages (checked
# against the generated descriptors by tests/test_definition.py): the JSON form
# is read here, without the protobuf library.


@dataclass(frozen=True)
class Field:
    #: "string", "int", "bool", "map" (string -> string) or a nested message's fields
    kind: str | Mapping[str, Field]
    repeated: bool = False
    #: proto3 ``optional``: null (unset) is a value of its own
    optional: bool = False


Schema = Mapping[str, "Field"]

_S, _I, _B, _M = Field("string"), Field("int"), Field("bool"), Field("map")
_RS = Field("string", repeated=True)

SOURCE: Schema = {"identifier": _S, "attrs": _M}
HTTP: Schema = {"url": _S, "checksum": _S, "filename": _S}
MOUNT: Schema = {
    "target": _S,
    "type": _S,
    "input": _I,
    "selector": _S,
    "readonly": _B,
    "options": _M,
}
HOST: Schema = {"name": _S, "ip": _S}
EXEC: Schema = {
    "args": _RS,
    "env": _RS,
    "cwd": _S,
    "user": _S,
    "network": _S,
    "hostname": _S,
    "mounts": Field(MOUNT, repeated=True),
    "ulimits": _RS,
    "shm_size": _I,
    "security": _S,
    "extra_hosts": Field(HOST, repeated=True),
}
COPY: Schema = {
    "src_input": _I,
    "src": _S,
    "dest": _S,
    "chown": _S,
    "chmod": Field("int", optional=True),
    "follow_symlinks": _B,
    "allow_wildcard": _B,
    "allow_empty_wildcard": _B,
    "create_dest_path": _B,
    "dir_contents_only": _B,
    "dest_is_dir": _B,
    "exclude": _RS,
    "unpack_archive": _B,
    "parents": _B,
    "chmod_symbolic": _S,
    "multi_source": _B,
}
MKDIR: Schema = {"path": _S, "mode": _I, "make_parents": _B, "chown": _S}
MKFILE: Schema = {"path": _S, "data": _S, "mode": _I, "chown": _S}
RM: Schema = {"path": _S, "allow_not_found": _B, "allow_wildcard": _B}
ACTION: Schema = {
    "copy": Field(COPY),
    "mkdir": Field(MKDIR),
    "mkfile": Field(MKFILE),
    "rm": Field(RM),
}
FILE: Schema = {"actions": Field(ACTION, repeated=True), "cwd": _S}


@dataclass(frozen=True)
class OpKind:
    """One op type of the format: its body's fields (the ``Op`` oneof member of
    the same name in protobuf), and how its JSON body (``op.to_json()[name]``)
    becomes the op again."""

    schema: Schema
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
    known = set(COPY)
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
        SOURCE,
        lambda b: SourceOp(b["identifier"], tuple(sorted((b.get("attrs") or {}).items()))),
    ),
    "http": OpKind(HTTP, lambda b: HttpSourceOp(**b)),
    "exec": OpKind(EXEC, _exec),
    "file": OpKind(FILE, _file),
    "merge": OpKind({}, lambda b: MergeOp()),
    "diff": OpKind({}, lambda b: DiffOp()),
}


# --- encoding ----------------------------------------------------------------------


def op_json(v: Vertex) -> tuple[str, dict[str, Any]]:
    """The op type's name and body of ``v`` (refused: an op type the format
    cannot say, such as a plugin's own)."""
    body = v.op.to_json()
    if len(body) != 1 or next(iter(body)) not in OP_KINDS:
        raise DefinitionError(
            f"op type {type(v.op).__name__} ({', '.join(body)}) has no {VERSION} form "
            f"(known: {', '.join(OP_KINDS)})"
        )
    kind, inner = next(iter(body.items()))
    return kind, inner


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


def in_order(target: Vertex | None) -> list[Vertex]:
    """Every vertex under ``target`` once, inputs before their users (the
    order of both forms), digests computed."""
    if target is None:
        return []
    _digest_bottom_up(target)
    return list(target.walk())


def encode_json(target: Vertex | None, image_config: dict[str, Any] | None = None) -> bytes:
    """The JSON form of the definition of the graph under ``target``. Equal
    graphs give equal bytes."""
    doc: dict[str, Any] = {
        "version": VERSION,
        "target": target.digest if target is not None else "",
        "vertices": [
            {
                "digest": v.digest,
                "name": v.name,
                "inputs": [i.digest if i is not None else None for i in v.inputs],
                "op": dict([op_json(v)]),
                **({"ignore_cache": True} if v.ignore_cache else {}),
            }
            for v in in_order(target)
        ],
    }
    if image_config is not None:
        doc["image_config"] = image_config
    text = json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False)
    return text.encode() + b"\n"


# --- decoding ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One vertex as a definition states it, its inputs still digests."""

    digest: str
    name: str
    inputs: tuple[str | None, ...]
    ignore_cache: bool
    op: OpSpec


def check_size(data: bytes) -> None:
    """The byte cap, checked before a byte is parsed."""
    if len(data) > MAX_BYTES:
        raise DefinitionError(
            f"definition of {len(data)} bytes is over the limit of {MAX_BYTES} bytes"
        )


def is_json(data: bytes) -> bool:
    """Which form ``data`` is: no protobuf Definition starts with ``{`` or
    ``[`` (field 15 and 11 with the group wire types, which it has not)."""
    return data.lstrip()[:1] in (b"{", b"[")


def check_version(version: str) -> None:
    if version != VERSION:
        raise DefinitionError(
            f"unsupported definition version {version!r}: this worker reads {VERSION}"
        )


def too_many() -> DefinitionError:
    return DefinitionError(f"definition has more than {MAX_VERTICES} vertices")


def build_op(kind: str, body: dict[str, Any], where: str) -> OpSpec:
    """The op of type ``kind`` from its body (every field of the schema, or
    the JSON form's subset), its errors worded as the definition's."""
    try:
        return OP_KINDS[kind].build(body)
    except OciworkerError as exc:
        raise DefinitionError(f"{where} ({kind}): {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise DefinitionError(f"{where} ({kind}): invalid op: {exc}") from None


def read_config(raw: bytes) -> dict[str, Any]:
    """The image config of a protobuf definition (canonical JSON bytes)."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # deeply nested arrays recurse
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
                    raise too_many()
                i = ws(i)
                i = ws(i + 1) if text[i : i + 1] == "," else i
            i += 1
        else:
            _, i = dec.raw_decode(text, i)
        i = ws(i)
        i = ws(i + 1) if text[i : i + 1] == "," else i


def decode_json(data: bytes) -> Definition:
    """A JSON definition as a graph, fully checked."""
    check_size(data)
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
    check_version(version)
    vertices = doc.get("vertices") or []
    if not isinstance(vertices, list):
        raise DefinitionError("definition: vertices is not a list")
    if len(vertices) > MAX_VERTICES:
        raise too_many()
    raws = [_json_vertex(v, i) for i, v in enumerate(vertices)]
    target = doc.get("target") or ""
    config = doc.get("image_config")
    if config is not None and not isinstance(config, dict):
        raise DefinitionError("image config is not a JSON object")
    if not isinstance(target, str):
        raise DefinitionError("definition: target is not a digest")
    return Definition(link(raws, target), config, version)


def _json_vertex(v: Any, index: int) -> Record:
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
    _check_json(OP_KINDS[kind].schema, body, f"{where} {kind}")
    inputs = v.get("inputs") or []
    if not isinstance(inputs, list) or not all(i is None or isinstance(i, str) for i in inputs):
        raise DefinitionError(f"{where}: inputs must be a list of digests (null: scratch)")
    name, digest = v.get("name", ""), v.get("digest", "")
    if not isinstance(name, str) or not isinstance(digest, str):
        raise DefinitionError(f"{where}: digest and name are strings")
    op_ = build_op(kind, body, where)
    return Record(digest, name, tuple(inputs), bool(v.get("ignore_cache")), op_)


_JSON_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,),
    "bytes": (str,),
    "int": (int,),
    "bool": (bool,),
}


def _check_json(schema: Schema, value: Any, where: str) -> None:
    """The JSON body has the schema's fields and types (so a bad one is named
    here, not met later by the op's handler)."""
    if not isinstance(value, dict):
        raise DefinitionError(f"{where}: not an object")
    for key, item in value.items():
        f = schema.get(key)
        if f is None:
            raise DefinitionError(f"{where}: unknown field {key!r}")
        at = f"{where}.{key}"
        if item is None and f.optional:
            continue
        if f.kind == "map":
            if not isinstance(item, dict) or not all(
                isinstance(k, str) and isinstance(x, str) for k, x in item.items()
            ):
                raise DefinitionError(f"{at}: want an object of strings")
            continue
        items = item if f.repeated else [item]
        if f.repeated and not isinstance(item, list):
            raise DefinitionError(f"{at}: want a list")
        for x in items:
            if not isinstance(f.kind, str):
                # the JSON form writes a host as [name, ip] (ExecOp.to_json)
                if f.kind is HOST and isinstance(x, list):
                    if len(x) != 2 or not all(isinstance(s, str) for s in x):
                        raise DefinitionError(f"{at}: want [name, ip]")
                    continue
                _check_json(f.kind, x, at)
                continue
            want = _JSON_TYPES[f.kind]
            if not isinstance(x, want) or (f.kind == "int" and isinstance(x, bool)):
                raise DefinitionError(f"{at}: want a {f.kind}")


# --- linking and checking ----------------------------------------------------------


def link(raws: Sequence[Record], target: str) -> Vertex | None:
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
