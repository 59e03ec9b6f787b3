"""Property tests for the graph definition validator (core/definition.py,
definition.py).

* Random valid graphs (every op type, shared inputs, scratch inputs, odd
  names) survive encode -> decode in both forms with the same shape: every
  vertex's op, name, ignore-cache flag and input positions, compared with the
  graph that was encoded; both forms decode to the same graph.
* Hostile definitions made from valid ones (a dangling input, a cycle, a
  self-loop, a stated digest that does not match, a random field set to a
  random JSON value, random bytes flipped in the protobuf form, more vertices
  than the limit) are refused with ``DefinitionError``, never another
  exception; one that is accepted is a graph that encodes and decodes again.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ociworker import definition as pb_definition
from ociworker.api.v1 import graph_pb2
from ociworker.core import definition as core_definition
from ociworker.core.build import Ulimit
from ociworker.core.graph import (
    Copy,
    DiffOp,
    ExecMount,
    ExecOp,
    FileOp,
    HttpSourceOp,
    MergeOp,
    Mkdir,
    Mkfile,
    Rm,
    SourceOp,
    Vertex,
)
from ociworker.definition import DefinitionError, decode, encode

pytestmark = pytest.mark.stress

TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12
)
PATH = st.lists(st.sampled_from(["a", "b c", "é", ".", "x.tar"]), max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)
PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=2, unique_by=lambda kv: kv[0]).map(
    lambda kv: tuple(sorted(kv))
)
PIN = "sha256:" + "a" * 64


def source_op() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(
            SourceOp,
            st.sampled_from([f"docker-image://r/i@{PIN}", "local://context", "git://h/r#main"]),
            PAIRS,
        ),
        st.builds(HttpSourceOp, st.just("https://h/f"), st.sampled_from(["", PIN]), TEXT),
    )


@st.composite
def exec_op(draw: st.DrawFn, n: int) -> ExecOp:
    mounts = draw(
        st.lists(
            st.builds(
                ExecMount,
                PATH,
                st.sampled_from(["bind", "cache", "tmpfs", "secret", "ssh"]),
                st.integers(-1, n - 1),
                PATH,
                st.booleans(),
                PAIRS,
            ),
            max_size=2,
        )
    )
    return ExecOp(
        args=tuple(draw(st.lists(TEXT, min_size=1, max_size=3))),
        env=tuple(draw(st.lists(TEXT, max_size=2))),
        cwd=draw(PATH),
        user=draw(TEXT),
        network=draw(st.sampled_from(["default", "none", "host"])),
        hostname=draw(TEXT),
        mounts=tuple(mounts),
        ulimits=tuple(
            draw(
                st.lists(
                    st.builds(Ulimit, st.just("nofile"), st.just(1024), st.just(2048)), max_size=1
                )
            )
        ),
        shm_size=draw(st.integers(0, 1 << 40)),
        security=draw(st.sampled_from(["sandbox", "insecure"])),
        extra_hosts=tuple(draw(st.lists(st.tuples(TEXT, st.just("10.0.0.1")), max_size=2))),
    )


@st.composite
def file_op(draw: st.DrawFn, n: int) -> FileOp:
    kinds = [
        st.builds(Mkdir, PATH, st.integers(0, 0o7777), st.booleans(), TEXT),
        st.builds(Mkfile, PATH, TEXT, st.integers(0, 0o7777), TEXT),
        st.builds(Rm, PATH, st.booleans(), st.booleans()),
    ]
    if n:
        kinds.append(
            st.builds(
                Copy,
                st.integers(0, n - 1),
                PATH,
                PATH,
                chmod=st.none() | st.integers(0, 0o7777),
                exclude=st.lists(TEXT, max_size=2).map(tuple),
                chmod_symbolic=st.sampled_from(["", "u+x"]),
                multi_source=st.booleans(),
            )
        )
    return FileOp(tuple(draw(st.lists(st.one_of(kinds), min_size=1, max_size=3))), draw(PATH))


@st.composite
def graphs(draw: st.DrawFn, max_vertices: int = 8) -> Vertex:
    made: list[Vertex] = []
    for _ in range(draw(st.integers(1, max_vertices))):

        def some_input() -> Vertex | None:
            return draw(st.sampled_from([None, *made])) if made else None

        kind = draw(st.sampled_from(["source", "exec", "file", "merge", "diff"]))
        if kind == "source" or not made:
            op: Any = draw(source_op())
            inputs: tuple[Vertex | None, ...] = ()
        elif kind == "merge":
            inputs = tuple(some_input() for _ in range(draw(st.integers(1, 3))))
            op = MergeOp()
        elif kind == "diff":
            inputs = (some_input(), some_input())
            op = DiffOp()
        else:
            inputs = tuple(some_input() for _ in range(draw(st.integers(0, 3))))
            op = draw(exec_op(len(inputs)) if kind == "exec" else file_op(len(inputs)))
        made.append(Vertex(op, inputs, name=draw(TEXT), ignore_cache=draw(st.booleans())))
    # the target uses the last few, so most vertices are reachable
    tail = [v for v in made[-3:]]
    return Vertex(MergeOp(), tuple(tail), name="target") if len(tail) > 1 else tail[0]


def shape(target: Vertex | None) -> list[tuple[object, ...]]:
    """The graph as plain values: each vertex (inputs first) with its op, name,
    flag and the positions of its inputs in this list; no digest involved."""
    if target is None:
        return []
    order: list[Vertex] = []
    index: dict[int, int] = {}

    def visit(v: Vertex) -> int:
        if id(v) in index:
            return index[id(v)]
        ins = tuple(visit(i) if i is not None else None for i in v.inputs)
        order.append(v)
        index[id(v)] = len(order) - 1
        out.append((v.op, v.name, v.ignore_cache, ins))
        return index[id(v)]

    out: list[tuple[object, ...]] = []
    visit(target)
    return out


def _dedupe(target: Vertex) -> Vertex:
    """Equal vertices made twice are one vertex once encoded; the shape compared
    is that of the graph with the first of each kept (what a definition says)."""
    seen: dict[str, Vertex] = {}

    def visit(v: Vertex) -> Vertex:
        if v.digest in seen:
            return seen[v.digest]
        new = Vertex(
            v.op,
            tuple(visit(i) if i is not None else None for i in v.inputs),
            name=v.name,
            ignore_cache=v.ignore_cache,
        )
        seen[v.digest] = new
        return new

    return visit(target)


CONFIG = st.none() | st.dictionaries(TEXT, TEXT | st.integers() | st.lists(TEXT), max_size=3)


@given(graphs(), CONFIG)
def test_valid_graphs_round_trip_in_both_forms(
    target: Vertex, config: dict[str, Any] | None
) -> None:
    want = shape(_dedupe(target))
    decoded = {}
    for fmt in ("pb", "json"):
        data = encode(target, config, fmt=fmt)
        d = decode(data)
        assert shape(d.target) == want, fmt
        assert d.image_config == config, fmt
        decoded[fmt] = d
    assert decoded["pb"].target is not None and decoded["json"].target is not None
    assert decoded["pb"].target.digest == decoded["json"].target.digest


def _doc(target: Vertex) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(encode(target, fmt="json"))
    return doc


def _refused(doc: dict[str, Any]) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        decode(json.dumps(doc).encode())
    return info.value


@given(graphs(), st.data())
def test_a_dangling_input_is_refused(target: Vertex, data: st.DataObject) -> None:
    doc = _doc(target)
    users = [v for v in doc["vertices"] if v["inputs"]]
    if not users:
        return
    v = data.draw(st.sampled_from(users))
    v["inputs"][data.draw(st.integers(0, len(v["inputs"]) - 1))] = "sha256:" + "f" * 64
    err = _refused(doc)
    assert "does not define" in str(err) or "digest" in str(err)


@given(graphs(), st.data())
def test_a_cycle_is_refused(target: Vertex, data: st.DataObject) -> None:
    doc = _doc(target)
    vertices = doc["vertices"]
    # every vertex is an ancestor of the target: pointing one at the target
    # (or at itself) closes a loop
    v = data.draw(st.sampled_from(vertices))
    loop_to = data.draw(st.sampled_from([doc["target"], v["digest"]]))
    if v["inputs"]:
        v["inputs"][data.draw(st.integers(0, len(v["inputs"]) - 1))] = loop_to
    else:
        v["inputs"] = [loop_to]
    _refused(doc)


@given(graphs(), st.data())
def test_a_stated_digest_that_does_not_match_is_refused(
    target: Vertex, data: st.DataObject
) -> None:
    doc = _doc(target)
    v = data.draw(st.sampled_from(doc["vertices"]))
    ((kind, body),) = v["op"].items()
    if kind in ("merge", "diff"):
        v["op"] = {"source": {"identifier": "local://other", "attrs": {}}}
        v["inputs"] = []
    elif kind == "source":
        body["identifier"] += "x"
    elif kind == "http":
        body["url"] += "x"
    elif kind == "exec":
        body["args"] = [*body["args"], "extra"]
    else:
        body["cwd"] = body["cwd"] + "/z"
    assert "digest" in str(_refused(doc))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | TEXT | st.floats(allow_nan=True),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


def _accepted_is_sound(data: bytes) -> None:
    try:
        d = decode(data)
    except DefinitionError:
        return
    # accepted: a graph this worker can write and read back as itself
    for fmt in ("pb", "json"):
        again = decode(encode(d.target, d.image_config, fmt=fmt))
        assert shape(again.target) == shape(d.target)


@given(graphs(), st.data(), JSON_VALUES)
def test_any_field_set_to_any_json_value_is_refused_or_sound(
    target: Vertex, data: st.DataObject, value: Any
) -> None:
    doc = _doc(target)
    v = data.draw(st.sampled_from(doc["vertices"]))
    ((_, body),) = v["op"].items()
    where = data.draw(st.sampled_from(["vertex", "body", "top"]))
    if where == "top":
        key = data.draw(st.sampled_from(["version", "target", "vertices", "image_config", "x"]))
        doc[key] = value
    elif where == "vertex":
        v[data.draw(st.sampled_from(["digest", "name", "inputs", "op", "ignore_cache", "x"]))] = (
            value
        )
    else:
        body[data.draw(st.sampled_from([*body, "x"]))] = value
    _accepted_is_sound(json.dumps(doc).encode())


@given(graphs(), st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=4))
def test_flipped_protobuf_bytes_are_refused_or_sound(
    target: Vertex, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(encode(target, {"a": "b"}, fmt="pb"))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    _accepted_is_sound(bytes(data))


@given(graphs(max_vertices=10), st.integers(1, 6), st.sampled_from(["pb", "json"]))
def test_more_vertices_than_the_limit_are_refused(target: Vertex, limit: int, fmt: str) -> None:
    count = len(list(target.walk()))
    data = encode(target, fmt=fmt)  # type: ignore[arg-type]
    with (
        mock.patch.object(core_definition, "MAX_VERTICES", limit),
        mock.patch.object(pb_definition, "MAX_VERTICES", limit),
    ):
        if count > limit:
            assert "more than" in str(
                _refused(json.loads(data)) if fmt == "json" else _pb_refused(data)
            )
        else:
            decode(data)


def _pb_refused(data: bytes) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        decode(data)
    return info.value


DEEP = b"[" * 50_000 + b"]" * 50_000


def test_a_deeply_nested_image_config_is_refused_in_both_forms() -> None:
    # found by this suite's hostile-JSON cases (via the sync test's stats):
    # the protobuf form's image config went to json.loads with only ValueError
    # caught, so nesting past the recursion limit was a RecursionError traceback
    msg = graph_pb2.Definition.FromString(encode(Vertex(SourceOp("local://context"))))
    msg.image_config_json = DEEP
    with pytest.raises(DefinitionError, match="image config"):
        decode(msg.SerializeToString())
    doc = b'{"version": "graph.v1", "vertices": [], "target": "", "image_config": ' + DEEP + b"}"
    with pytest.raises(DefinitionError):
        decode(doc)
