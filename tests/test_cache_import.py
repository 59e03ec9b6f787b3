"""--cache-to / --cache-from: the specs as buildx spells them, the cache manifest's
format, and the solver's lazy use of an imported cache (arithmetic vertices)."""

from __future__ import annotations

import hashlib
import json

import pytest

from ociworker.core.cacheimport import (
    CACHE_CONFIG_MEDIA_TYPE,
    CacheConfig,
    CacheConfigBuilder,
    CacheSpec,
    cache_manifest,
    parse_cache_specs,
)
from ociworker.core.digest import Digest
from ociworker.core.graph import ExecOp, Vertex
from ociworker.core.oci import Descriptor, Layer
from ociworker.core.progress import Event, VertexStatus
from ociworker.errors import ConfigError, RegistryError
from ociworker.solver.scheduler import REMOTE, Job, Result, Solver
from ociworker.testing.fakes import ArithmeticHandler, MemoryCacheIndex

# --- specs ------------------------------------------------------------------------------


def test_bare_value_is_a_registry_ref_and_csv_fields_are_read_as_buildx() -> None:
    assert CacheSpec.parse("reg:5000/app:cache", export=False) == CacheSpec(
        "registry", (("ref", "reg:5000/app:cache"),)
    )
    spec = CacheSpec.parse("type=registry,ref=r/x:c,mode=max", export=True)
    assert (spec.type, spec.get("ref"), spec.mode, spec.export) == (
        "registry",
        "r/x:c",
        "max",
        True,
    )
    assert CacheSpec.parse("type=local,dest=/tmp/c", export=True).mode == "min"  # buildx default
    assert CacheSpec.parse('type=local,"src=/a,b"', export=False).get("src") == "/a,b"
    assert CacheSpec.parse("type=local,src=/c", export=False).tag == "latest"


@pytest.mark.parametrize(
    ("value", "export", "words"),
    [
        ("type=s3,bucket=b", True, "unknown cache type 's3'"),
        ("type=registry", True, "type=registry needs ref="),
        ("type=local", True, "type=local needs dest="),
        ("type=local,dest=x", False, "unknown attribute 'dest'"),
        ("type=registry,ref=r/x,mode=all", True, "mode must be min or max"),
        ("type=inline,mode=max", True, "mode=min"),
        ("type=inline", False, "imported from its image"),
        ("ref=r/x", True, "type is required"),
        ("type=registry,ref=r/x,ref=r/y", True, "ref is given twice"),
        ("type=registry,ref=r/x,ignore-error=maybe", True, "ignore-error must be true or false"),
        ("", False, "invalid --cache-from"),
    ],
)
def test_bad_specs_are_refused_naming_the_flag(value: str, export: bool, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        CacheSpec.parse(value, export=export)
    assert words in str(info.value)


def test_local_caches_are_refused_over_the_daemon_and_inline_once() -> None:
    with pytest.raises(ConfigError, match="not supported over the daemon"):
        parse_cache_specs(["type=local,src=/c"], export=False, over_daemon=True)
    assert parse_cache_specs(["type=registry,ref=r/x"], export=False, over_daemon=True)
    with pytest.raises(ConfigError, match="inline is given twice"):
        parse_cache_specs(["type=inline", "type=inline"], export=True)


# --- format -------------------------------------------------------------------------------


def _layer(data: bytes) -> Layer:
    d = Digest("sha256:" + hashlib.sha256(data).hexdigest())
    return Layer(Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", d, len(data)), d)


def test_config_lists_each_blob_once_and_round_trips_through_the_manifest() -> None:
    base, a, b = _layer(b"base"), _layer(b"a"), _layer(b"b")
    builder = CacheConfigBuilder()
    builder.add("k-base", "layers", [], [base], "FROM")
    builder.add("k-a", "layers", ["k-base", "k-ctx"], [base, a], "COPY a")
    builder.add("k-b", "layers", ["k-a"], [base, a, b], "RUN b")
    builder.add("k-ctx", "dir", [], (), "context")
    config = builder.build()
    assert [la.descriptor.digest for la in config.layers] == [
        la.descriptor.digest for la in (base, a, b)
    ]
    cfg, manifest = cache_manifest(config)
    m = json.loads(manifest)
    assert m["config"]["mediaType"] == CACHE_CONFIG_MEDIA_TYPE
    assert m["config"]["digest"] == "sha256:" + hashlib.sha256(cfg).hexdigest()
    assert [x["digest"] for x in m["layers"]] == [la.descriptor.digest for la in (base, a, b)]
    back = CacheConfig.from_bytes(cfg, "test")
    assert back == config
    rec = {r.key: r for r in back.records}
    assert back.chain_of(rec["k-b"]) == (base, a, b)
    assert rec["k-a"].inputs == ("k-base", "k-ctx")


@pytest.mark.parametrize(
    "data",
    [
        {"version": 1, "layers": [], "records": []},
        {"version": 0, "layers": [], "records": [{"key": "k", "kind": "layers", "chain": [0]}]},
        {"version": 0, "layers": [], "records": [{"key": "k", "kind": "weird"}]},
        [],
    ],
)
def test_a_config_that_is_no_cache_is_a_clear_registry_error(data: object) -> None:
    with pytest.raises(RegistryError, match="not a usable build cache"):
        CacheConfig.from_json(data, "cache r/x")


# --- the solver and an imported cache ---------------------------------------------------


def const(n: int) -> Vertex:
    return Vertex(ExecOp(args=("const", str(n))), name=f"const {n}")


def add(n: int, *inputs: Vertex) -> Vertex:
    return Vertex(ExecOp(args=("add", str(n))), tuple(inputs), name=f"add {n}")


class FakeImport:
    """A CacheSource holding what another worker's job solved (key -> value)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.materialized: list[str] = []

    def knows(self, key: str) -> bool:
        return key in self.values

    async def lookup(self, key: str) -> Result | None:
        return Result(REMOTE, key) if key in self.values else None

    async def materialize(self, result: Result) -> Result:
        self.materialized.append(result.ref)
        return Result("snapshot", self.values[result.ref])


async def _exported(target: Vertex, keep: set[str] | None = None) -> dict[str, str]:
    """Worker 1: solve ``target`` and export every vertex (or those named in ``keep``)."""
    job = Job(id="w1")
    await Solver(ArithmeticHandler(), MemoryCacheIndex()).solve(target, job)
    by_digest = {v.digest: v for v in target.walk()}
    return {
        job.keys[d]: r.ref
        for d, r in job.results.items()
        if keep is None or by_digest[d].name in keep
    }


def _states(events: list[Event]) -> dict[str, str]:
    return {
        e.name: "CACHED" if e.cached else "DONE"
        for e in events
        if isinstance(e, VertexStatus) and (e.cached or e.completed is not None)
    }


async def test_a_fully_imported_build_runs_and_materializes_nothing() -> None:
    top = add(1, add(2, const(3)))
    imported = FakeImport(await _exported(top))
    h, events = ArithmeticHandler(), []  # type: ignore[var-annotated]
    job = Job(id="w2", events=events.append, imported=imported)
    result = await Solver(h, MemoryCacheIndex()).solve(top, job)
    assert result.kind == REMOTE  # lazy: the output decides whether it needs files
    assert h.runs == {} and imported.materialized == []
    assert _states(events) == {"const 3": "CACHED", "add 2": "CACHED", "add 1": "CACHED"}


async def test_a_step_that_runs_materializes_its_imported_input_once() -> None:
    shared = add(2, const(3))
    imported = FakeImport(await _exported(add(1, shared)))
    # a new step on top of the imported chain, two users of it
    top = add(0, add(10, shared), add(20, shared))
    h, local = ArithmeticHandler(), MemoryCacheIndex()
    job = Job(id="w2", imported=imported)
    result = await Solver(h, local).solve(top, job)
    assert result == Result("snapshot", str((5 + 10) + (5 + 20)))  # computed from real values
    assert imported.materialized == [job.keys[shared.digest]]  # once, the one needed
    assert await local.lookup(job.keys[shared.digest]) == Result("snapshot", "5")
    assert {v.name for v in top.walk() if v.digest in h.runs} == {"add 0", "add 10", "add 20"}


async def test_a_record_whose_inputs_are_not_imported_waits_for_them() -> None:
    """min mode: the final step's record is there, an input stage's is not; the
    input runs, then the step is taken from the import (linked through it)."""
    stage = add(7, const(1))
    final = add(100, stage, const(2))
    keep = {"add 100", "const 2"}
    imported = FakeImport(await _exported(final, keep))
    h, events = ArithmeticHandler(), []  # type: ignore[var-annotated]
    job = Job(id="w2", events=events.append, imported=imported)
    result = await Solver(h, MemoryCacheIndex()).solve(final, job)
    assert {v.name for v in final.walk() if v.digest in h.runs} == {"const 1", "add 7"}
    assert result == Result(REMOTE, job.keys[final.digest])
    assert _states(events)["add 100"] == "CACHED"
    assert imported.materialized == []


async def test_no_cache_ignores_the_import() -> None:
    top = add(1, const(3))
    imported = FakeImport(await _exported(top))
    h = ArithmeticHandler()
    job = Job(id="w2", no_cache=True, imported=imported)
    assert (await Solver(h, MemoryCacheIndex()).solve(top, job)).ref == "4"
    assert sum(h.runs.values()) == 2
