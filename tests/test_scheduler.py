"""The scheduler, driven with arithmetic vertices (no runc, no disk)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from ociworker.cachedb.records import SQLiteCacheIndex
from ociworker.core.graph import ExecOp, Vertex
from ociworker.core.progress import Event, VertexStatus
from ociworker.solver.scheduler import CacheIndex, Job, Result, Solver
from ociworker.testing.fakes import ArithmeticHandler, MemoryCacheIndex


def const(n: int) -> Vertex:
    return Vertex(ExecOp(args=("const", str(n))), name=f"const {n}")


def add(n: int, *inputs: Vertex) -> Vertex:
    return Vertex(ExecOp(args=("add", str(n))), tuple(inputs), name=f"add {n}")


def fail(msg: str, *inputs: Vertex) -> Vertex:
    return Vertex(ExecOp(args=("fail", msg)), tuple(inputs), name=f"fail {msg}")


def make_job(events: list[Event] | None = None, no_cache: bool = False) -> Job:
    sink: Callable[[Event], None] = events.append if events is not None else (lambda e: None)
    return Job(id="j", events=sink, no_cache=no_cache)


async def test_computes_a_diamond_and_runs_shared_input_once() -> None:
    h = ArithmeticHandler()
    solver = Solver(h, MemoryCacheIndex())
    base = const(1)
    left, right = add(10, base), add(20, base)
    top = add(100, left, right)
    result = await solver.solve(top, make_job())
    assert result == Result("snapshot", str(100 + 11 + 21))
    assert h.runs[base.digest] == 1


async def test_identical_vertices_built_separately_are_deduplicated() -> None:
    h = ArithmeticHandler()
    solver = Solver(h, MemoryCacheIndex())
    a, b = add(5, const(1)), add(5, const(1))
    assert a is not b and a.digest == b.digest
    top = add(0, a, b)
    assert (await solver.solve(top, make_job())).ref == "12"
    assert sum(h.runs.values()) == 3


async def test_independent_vertices_run_concurrently_and_limit_is_honoured() -> None:
    h = ArithmeticHandler()
    h.delay = 0.05
    top = add(0, *[add(i, const(0)) for i in range(1, 6)])
    await Solver(h, MemoryCacheIndex()).solve(top, make_job())
    assert h.max_active == 5

    h2 = ArithmeticHandler()
    h2.delay = 0.05
    await Solver(h2, MemoryCacheIndex(), max_parallelism=2).solve(top, make_job())
    assert h2.max_active == 2


async def test_cache_hit_skips_vertex_and_its_inputs() -> None:
    h = ArithmeticHandler()
    cache = MemoryCacheIndex()
    top = add(1, add(2, const(3)))
    await Solver(h, cache).solve(top, make_job())
    assert sum(h.runs.values()) == 3

    events: list[Event] = []
    h2 = ArithmeticHandler()
    assert (await Solver(h2, cache).solve(top, make_job(events))).ref == "6"
    assert h2.runs == {}
    statuses = [e for e in events if isinstance(e, VertexStatus)]
    assert [s.cached for s in statuses] == [True]  # inputs of a hit are not even visited


async def test_no_cache_reruns_everything() -> None:
    h = ArithmeticHandler()
    cache = MemoryCacheIndex()
    top = add(1, const(3))
    await Solver(h, cache).solve(top, make_job())
    await Solver(h, cache).solve(top, make_job(no_cache=True))
    assert set(h.runs.values()) == {2}


async def test_concurrent_jobs_share_one_run_of_the_same_key() -> None:
    h = ArithmeticHandler()
    h.gate = asyncio.Event()
    solver = Solver(h, MemoryCacheIndex())
    v = add(1, const(1))
    jobs = [asyncio.create_task(solver.solve(add(i, v), make_job())) for i in range(4)]
    await asyncio.sleep(0.05)
    h.gate.set()
    results = await asyncio.gather(*jobs)
    assert [r.ref for r in results] == ["2", "3", "4", "5"]
    assert h.runs[v.digest] == 1


async def test_failure_cancels_siblings_and_reports_error() -> None:
    h = ArithmeticHandler()
    h.delay = 0.2
    events: list[Event] = []
    slow = add(1, const(0))
    top = add(0, slow, fail("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await Solver(h, MemoryCacheIndex()).solve(top, make_job(events))
    errors = [e for e in events if isinstance(e, VertexStatus) and e.error]
    assert any("boom" in (e.error or "") for e in errors)


async def test_cancelling_one_job_keeps_a_shared_run_alive_for_the_other() -> None:
    h = ArithmeticHandler()
    h.gate = asyncio.Event()
    solver = Solver(h, MemoryCacheIndex())
    v = add(7, const(0))
    first = asyncio.create_task(solver.solve(v, make_job()))
    second = asyncio.create_task(solver.solve(v, make_job()))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    h.gate.set()
    assert (await second).ref == "7"


async def test_cancelling_the_only_job_cancels_the_run() -> None:
    h = ArithmeticHandler()
    h.gate = asyncio.Event()
    solver = Solver(h, MemoryCacheIndex())
    job = asyncio.create_task(solver.solve(add(1, const(0)), make_job()))
    await asyncio.sleep(0.05)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert h.active == 0


# --- one suite for every CacheIndex ----------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def cache_index(request: pytest.FixtureRequest, tmp_path: Path) -> CacheIndex:
    if request.param == "memory":
        return MemoryCacheIndex()
    return SQLiteCacheIndex(tmp_path / "cache.db")


async def test_cache_index_suite(cache_index: CacheIndex) -> None:
    assert await cache_index.lookup("k") is None
    await cache_index.record("k", Result("snapshot", "s1"), "step one")
    assert await cache_index.lookup("k") == Result("snapshot", "s1")
    await cache_index.record("k", Result("snapshot", "s2"), "step one again")
    assert await cache_index.lookup("k") == Result("snapshot", "s2")


async def test_sqlite_index_persists_and_drops_invalid_records(tmp_path: Path) -> None:
    idx = SQLiteCacheIndex(tmp_path / "cache.db")
    await idx.record("k", Result("snapshot", "gone"), "d")
    idx.close()

    async def invalid(_: Result) -> bool:
        return False

    reopened = SQLiteCacheIndex(tmp_path / "cache.db")
    assert await reopened.lookup("k") == Result("snapshot", "gone")
    checking = SQLiteCacheIndex(tmp_path / "cache.db", validate=invalid)
    assert await checking.lookup("k") is None
    assert reopened.records() == []
