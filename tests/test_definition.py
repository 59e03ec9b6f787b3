"""The serialized graph (graph.v1): round trips keep every vertex digest, the
JSON form has the protobuf schema's fields, and a hostile definition is
refused, by name, before anything could run."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ociworker.api.v1 import graph_pb2
from ociworker.core import definition as core_definition
from ociworker.core.build import Ulimit
from ociworker.core.graph import (
    Copy,
    ExecMount,
    ExecOp,
    FileOp,
    HttpSourceOp,
    Mkdir,
    Mkfile,
    Rm,
    SourceOp,
    Vertex,
)
from ociworker.definition import MAX_BYTES, DefinitionError, decode, encode
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, convert
from ociworker.frontend.dockerfile.parser import parse

BENCH = Path(__file__).parent / "data" / "bench"
PIN = "sha256:" + "a" * 64


def _every_op() -> Vertex:
    """A graph with every op type and every optional field set somewhere."""
    base = Vertex(SourceOp(f"docker-image://reg/base@{PIN}"), name="FROM base")
    ctx = Vertex(SourceOp("local://context", (("includepattern", "a"), ("exclude", "b"))))
    git = Vertex(SourceOp("git://example.com/r.git#main", (("git.keepgitdir", "false"),)))
    url = Vertex(HttpSourceOp("https://example.com/f.tgz", "sha256:" + "c" * 64, "f.tgz"))
    run = Vertex(
        ExecOp(
            ("/bin/sh", "-c", "make ${X}"),
            env=("A=1", "B=two words"),
            cwd="/src",
            user="1000:1000",
            network="none",
            hostname="builder",
            mounts=(
                ExecMount("/ctx", "bind", 1, "/sub", True, (("k", "v"),)),
                ExecMount("/cache", "cache", -1, "/", False, (("id", "c"), ("sharing", "locked"))),
                ExecMount("/run/secrets/t", "secret", -1, "/", True, (("id", "t"),)),
            ),
            ulimits=(Ulimit("nofile", 1024, 2048),),
            shm_size=1 << 20,
            security="insecure",
            extra_hosts=(("db", "10.0.0.2"),),
        ),
        (base, ctx),
        name="RUN make",
    )
    files = Vertex(
        FileOp(
            (
                Copy(1, "/a/*.c", "/src/", chmod=0, dest_is_dir=True, exclude=("*.o",)),
                Copy(2, "/", "/git", follow_symlinks=False, chown="1:2", parents=True),
                Copy(3, "/f.tgz", "/x", chmod_symbolic="u+x", multi_source=True),
                Copy(3, "/f.tgz", "/y", unpack_archive=True, allow_empty_wildcard=True),
                Mkdir("/d/e", 0o700, False, "0:0"),
                Mkfile("/d/f", "data\nwith ünïcode\n", 0o600),
                Rm("/tmp/*", allow_not_found=False, allow_wildcard=True),
            ),
            cwd="/work",
        ),
        (run, ctx, git, url),
        name="COPY and friends",
    )
    scratch = Vertex(FileOp((Mkfile("/only", "x", 0o644),)), (None,), name="scratch file")
    return Vertex(
        FileOp((Copy(1, "/", "/from-scratch"),)), (files, scratch), ignore_cache=True, name="top"
    )


def _worker_digest(op_json: dict[str, Any], inputs: list[str | None]) -> str:
    # The worker's rule, written out here: sha256 over sorted compact JSON.
    raw = json.dumps(
        {"op": op_json, "inputs": inputs},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def _digests(v: Vertex | None) -> list[str]:
    return [x.digest for x in v.walk()] if v is not None else []


@pytest.mark.parametrize("fmt", ["pb", "json"])
def test_every_op_type_round_trips_with_the_same_digests(fmt: str) -> None:
    target = _every_op()
    config = {"config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]}, "history": []}
    data = encode(target, config, fmt)  # type: ignore[arg-type]
    got = decode(data)
    assert got.target is not None and got.target.digest == target.digest
    assert _digests(got.target) == _digests(target)
    assert [v.name for v in got.target.walk()] == [v.name for v in target.walk()]
    assert got.target.ignore_cache and got.image_config == config
    # canonical: the decoded graph writes the same bytes
    assert encode(got.target, got.image_config, fmt) == data  # type: ignore[arg-type]


def test_protobuf_document_is_the_graph_vertex_for_vertex() -> None:
    target = _every_op()
    data = encode(target, {"config": {}}, "pb")
    msg = graph_pb2.Definition.FromString(data)
    assert msg.SerializeToString(deterministic=True) == data
    assert msg.version == "graph.v1" and msg.target == target.digest
    assert json.loads(msg.image_config_json) == {"config": {}}
    ours = list(target.walk())
    assert [v.digest for v in msg.vertices] == [v.digest for v in ours]
    for pv, v in zip(msg.vertices, ours, strict=True):
        assert pv.op.WhichOneof("op") == next(iter(v.op.to_json()))
        assert list(pv.inputs) == [i.digest if i else "" for i in v.inputs]
    # and what protoc writes, we read
    assert decode(msg.SerializeToString()).target == target


_KINDS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_INT64: "int",
    FieldDescriptor.TYPE_BOOL: "bool",
}


def _schema_of(desc: Descriptor) -> dict[str, Any]:
    """A message's fields as core.definition's JSON schema says them, read off
    the descriptor protoc generated from graph.proto."""
    out: dict[str, Any] = {}
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            kind: Any = "map"
        elif f.message_type is not None:
            kind = _schema_of(f.message_type)
        else:
            kind = _KINDS[f.type]
        repeated = f.is_repeated and kind != "map"
        out[f.name] = (kind, repeated, f.has_presence and f.message_type is None)
    return out


def _core_schema(schema: core_definition.Schema) -> dict[str, Any]:
    return {
        name: (
            f.kind if isinstance(f.kind, str) else _core_schema(f.kind),
            f.repeated,
            f.optional,
        )
        for name, f in schema.items()
    }


def test_json_schema_is_the_protobuf_schema() -> None:
    # The JSON form is read in core, without protobuf: its field list must not
    # drift from graph.proto's (a field one form has and the other lacks would
    # be lost on a round trip through it).
    ops = {f.name: f.message_type for f in graph_pb2.Op.DESCRIPTOR.fields}
    assert sorted(ops) == sorted(core_definition.OP_KINDS)
    for name, desc in ops.items():
        assert _core_schema(core_definition.OP_KINDS[name].schema) == _schema_of(desc), name


def test_json_form_is_canonical_and_states_the_worker_digest() -> None:
    target = _every_op()
    text = encode(target, None, "json")
    doc = json.loads(text)
    assert text == (json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    for v in doc["vertices"]:
        assert v["digest"] == _worker_digest(v["op"], v["inputs"])
    assert doc["target"] == doc["vertices"][-1]["digest"]


def _bench_graph(case: str) -> Vertex:
    parsed = parse((BENCH / case / "Dockerfile").read_text())
    images: dict[str, ImageInfo] = {}
    opts = Options()
    while True:
        plan = convert(parsed, opts, images)
        if not plan.missing:
            break
        for m in plan.missing:
            images[m] = ImageInfo(ref=f"127.0.0.1:5000/busybox@{PIN}", config={"config": {}})
    assert plan.target is not None
    return plan.target


@pytest.mark.parametrize("fmt", ["pb", "json"])
@pytest.mark.parametrize("case", sorted(p.name for p in BENCH.iterdir()))
def test_bench_cases_graphs_round_trip(case: str, fmt: str) -> None:
    target = _bench_graph(case)
    got = decode(encode(target, None, fmt))  # type: ignore[arg-type]
    assert got.target is not None
    assert _digests(got.target) == _digests(target)
    assert len(_digests(target)) >= 2


def test_scratch_target_and_no_config() -> None:
    for fmt in ("pb", "json"):
        got = decode(encode(None, None, fmt))  # type: ignore[arg-type]
        assert got.target is None and got.image_config is None


# --- hostile or malformed definitions --------------------------------------------------


def _doc(vertices: list[dict[str, Any]], target: str = "", version: str = "graph.v1") -> bytes:
    return json.dumps({"version": version, "target": target, "vertices": vertices}).encode()


def _raw(op: dict[str, Any], inputs: list[str | None], name: str = "") -> dict[str, Any]:
    return {"digest": _worker_digest(op, inputs), "name": name, "inputs": inputs, "op": op}


def _refused(data: bytes, *words: str) -> str:
    with pytest.raises(DefinitionError) as info:
        decode(data)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_cycle_is_refused() -> None:
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    op = {"exec": {"args": ["true"]}}
    vs = [
        {"digest": a, "name": "a", "inputs": [b], "op": op},
        {"digest": b, "name": "b", "inputs": [a], "op": op},
    ]
    _refused(_doc(vs, a), "cycle")
    self_loop = [{"digest": a, "name": "a", "inputs": [a], "op": op}]
    _refused(_doc(self_loop, a), "cycle")


def test_dangling_input_is_refused() -> None:
    missing = "sha256:" + "3" * 64
    v = _raw({"exec": {"args": ["true"]}}, [missing], "run")
    _refused(_doc([v], v["digest"]), "input 0", missing, "does not define")


def test_unknown_op_type_is_refused_by_name() -> None:
    v = _raw({"build": {"def": "x"}}, [])
    _refused(_doc([v], v["digest"]), "unknown op type 'build'", "exec")
    # in protobuf an op is a oneof field: a number the worker does not know
    vertex = graph_pb2.Vertex(digest="sha256:" + "4" * 64, name="future op")
    # Vertex.op (field 5) holding Op field 7 (empty): no op type of graph.v1
    raw_vertex = vertex.SerializeToString() + b"\x2a\x02\x3a\x00"
    data = b"\x0a\x08graph.v1" + b"\x12" + bytes([len(raw_vertex)]) + raw_vertex
    _refused(data, "unknown op type", "Op field 7")


def _definition_with(vertex: bytes) -> bytes:
    return b"\x0a\x08graph.v1" + b"\x12" + bytes([len(vertex)]) + vertex


def test_unknown_fields_at_any_depth_are_refused_by_number() -> None:
    mount = graph_pb2.ExecMount(target="/m", type="tmpfs", input=-1).SerializeToString()
    mount += b"\xa0\x01\x01"  # field 20, a varint: no field of ExecMount
    exec_ = graph_pb2.ExecOp(args=["true"]).SerializeToString() + b"\x3a" + bytes([len(mount)])
    op = b"\x1a" + bytes([len(exec_ + mount)]) + exec_ + mount
    vertex = graph_pb2.Vertex(digest=PIN).SerializeToString() + b"\x2a" + bytes([len(op)]) + op
    _refused(_definition_with(vertex), "vertex 0", "mounts[0]", "unknown field 20 of ExecMount")
    # a known number with another wire type is not that field either: cwd (3) as a varint
    exec_ = graph_pb2.ExecOp(args=["true"]).SerializeToString() + b"\x18\x05"
    op = b"\x1a" + bytes([len(exec_)]) + exec_
    vertex = graph_pb2.Vertex(digest=PIN).SerializeToString() + b"\x2a" + bytes([len(op)]) + op
    _refused(_definition_with(vertex), "vertex 0", "unknown field 3 of ExecOp")
    # and at the top: a Definition field 9
    _refused(b"\x0a\x08graph.v1\x4a\x00", "unknown field 9 of Definition")


def test_a_string_that_is_not_utf8_is_refused() -> None:
    vertex = graph_pb2.Vertex(digest=PIN, name="x").SerializeToString().replace(b"x", b"\xff")
    _refused(_definition_with(vertex), "malformed definition")


def test_unknown_version_and_fields_are_refused_by_name() -> None:
    _refused(_doc([], "", "graph.v2"), "unsupported definition version 'graph.v2'", "graph.v1")
    _refused(b"\x0a\x08graph.v9", "'graph.v9'")
    v = _raw({"exec": {"args": ["true"], "privileged": True}}, [])
    _refused(_doc([v], v["digest"]), "unknown field 'privileged'")
    _refused(json.dumps({"version": "graph.v1", "extra": 1}).encode(), "unknown field 'extra'")
    _refused(b"", "no version")


@pytest.mark.parametrize(
    "action",
    [
        {"copy": {"src_input": 1, "src": "/../../etc/shadow", "dest": "/x"}},
        {"copy": {"src_input": 1, "src": "/a", "dest": "../../host"}},
        {"mkdir": {"path": "/a/../../b", "mode": 493}},
        {"mkfile": {"path": "../x", "data": "x", "mode": 420}},
        {"rm": {"path": "/x/.."}},
    ],
)
def test_path_escapes_in_file_ops_are_refused(action: dict[str, Any]) -> None:
    ctx = _raw({"source": {"identifier": "local://context", "attrs": {}}}, [])
    v = _raw({"file": {"actions": [action], "cwd": "/"}}, [None, ctx["digest"]])
    _refused(_doc([ctx, v], v["digest"]), "escapes its root")


def test_stated_digest_must_be_the_content_digest() -> None:
    v = _raw({"exec": {"args": ["true"]}}, [])
    v["op"]["exec"]["args"] = ["rm", "-rf", "/"]  # the content changed, the digest did not
    _refused(_doc([v], v["digest"]), "is not its content's")


def test_wrong_types_and_bad_indexes_are_refused() -> None:
    v = _raw({"exec": {"args": "true"}}, [])
    _refused(_doc([v], v["digest"]), "exec.args: want a list")
    v = _raw({"file": {"actions": [{"mkdir": {"path": "/a", "mode": "755"}}]}}, [None])
    _refused(_doc([v], v["digest"]), "mode: want a int")
    v = _raw({"exec": {"args": ["x"], "mounts": [{"target": "/m", "input": 4}]}}, [])
    _refused(_doc([v], v["digest"]), "input 4 of 0")
    v = _raw({"file": {"actions": [{"copy": {"src_input": 3, "src": "/", "dest": "/"}}]}}, [None])
    _refused(_doc([v], v["digest"]), "copy from input 3 of 1")
    _refused(b"\x0a\x08graph.v1\x12\xff", "malformed definition")
    _refused(b"[1, 2]", "a JSON definition is an object")
    _refused(b'{"version": "graph.v1", "vertices": [', "malformed JSON")


def test_oversize_definition_is_refused_unread() -> None:
    _refused(b" " * (MAX_BYTES + 1), "over the limit")


_PEAK_RSS = """
import resource, sys
from ociworker.definition import DefinitionError, decode
data = b"\\x0a\\x08graph.v1" + b"\\x12\\x00" * int(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode(data)
except DefinitionError as exc:
    print(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_a_million_protobuf_vertices_fail_fast_in_bounded_memory() -> None:
    # The protobuf library allocates outside Python's allocator (tracemalloc
    # does not see it): the peak RSS of a fresh process is what counts. A
    # million of the smallest vertices (empty ones, two bytes each) parse
    # into some 75 MB in the library alone, and far more as Python values.
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, "1000000"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "more than 100000 vertices" in out[0]
    assert int(out[1]) < 32 << 10, f"peak RSS grew by {out[1]} KiB"


def test_a_group_cannot_hide_vertices_from_the_count() -> None:
    # an empty group (field 3) that the top-level walk could not step over,
    # then more vertices than the limit: refused before the parser sees them
    data = b"\x0a\x08graph.v1\x1b\x1c" + b"\x12\x00" * 200_000
    _refused(data, "malformed definition", "field 3 is a group")
    # what the parser alone would do: take the group as an unknown field and read on
    assert len(graph_pb2.Definition.FromString(data).vertices) == 200_000


def test_a_million_json_vertices_fail_fast_in_bounded_memory() -> None:
    # A million of the smallest vertices the JSON form allows (under the byte limit).
    data = b'{"version":"graph.v1","vertices":[' + b",".join([b"{}"] * 1_000_000) + b"]}"
    assert len(data) < MAX_BYTES
    tracemalloc.start()
    try:
        _refused(data, "more than")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # what a million parsed vertices would need is hundreds of MB
    assert peak < 64 << 20, f"peak {peak} bytes"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"args": ["x"], "network": "bridge0"}, "network 'bridge0'"),
        ({"args": ["x"], "security": "root"}, "security 'root'"),
        ({"args": ["x"], "mounts": [{"target": "/m", "type": "host"}]}, "mount type 'host'"),
        ({"args": ["x"], "mounts": [{"target": "/m/../../x", "type": "tmpfs"}]}, "escapes"),
        (
            {"args": ["x"], "mounts": [{"target": "/m", "selector": "/../..", "input": 0}]},
            "escapes",
        ),
        ({"args": ["x"], "shm_size": -1}, "negative shm_size"),
    ],
)
def test_exec_values_the_handler_cannot_take_are_refused(body: dict[str, Any], words: str) -> None:
    base = _raw({"source": {"identifier": f"docker-image://r/b@{PIN}", "attrs": {}}}, [])
    v = _raw({"exec": body}, [base["digest"]])
    _refused(_doc([base, v], v["digest"]), words)


@pytest.mark.parametrize(
    "action",
    [
        {"mkdir": {"path": "/a", "mode": 0o10000}},
        {"mkfile": {"path": "/a", "data": "", "mode": -1}},
        {"copy": {"src_input": 0, "src": "/a", "dest": "/b", "chmod": 0o77777}},
    ],
)
def test_file_modes_out_of_range_are_refused(action: dict[str, Any]) -> None:
    v = _raw({"file": {"actions": [action]}}, [None])
    _refused(_doc([v], v["digest"]), "not a permission mode")


def test_a_file_action_is_exactly_one_action() -> None:
    for action in ({}, {"mkdir": {"path": "/a"}, "rm": {"path": "/b"}}):
        v = _raw({"file": {"actions": [action]}}, [None])
        _refused(_doc([v], v["digest"]), "exactly one of copy, mkdir, mkfile, rm")
    # in protobuf: a FileAction with no member set
    data = encode(Vertex(FileOp((Mkdir("/a", 0o755),)), (None,)), None, "pb")
    msg = graph_pb2.Definition.FromString(data)
    msg.vertices[0].op.file.actions.add()
    _refused(msg.SerializeToString(), "exactly one of")
