"""The scheduler, driven with arithmetic vertices (no runc, no disk)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
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


class CountingCache(MemoryCacheIndex):
    """A MemoryCacheIndex that remembers every key it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups: list[str] = []

    async def lookup(self, key: str) -> Result | None:
        self.lookups.append(key)
        return await super().lookup(key)


def shown(events: list[Event]) -> list[tuple[str, str]]:
    """What a progress printer makes of the statuses: (step, CACHED|START|DONE|ERROR)."""
    out = []
    for e in events:
        if isinstance(e, VertexStatus):
            state = (
                "CACHED"
                if e.cached
                else "ERROR"
                if e.error
                else "DONE"
                if e.completed is not None
                else "START"
            )
            out.append((e.name, state))
    return out


async def test_cache_hit_skips_vertex_and_its_inputs() -> None:
    h = ArithmeticHandler()
    cache = CountingCache()
    top = add(1, add(2, const(3)))
    await Solver(h, cache).solve(top, make_job())
    assert sum(h.runs.values()) == 3

    events: list[Event] = []
    h2 = ArithmeticHandler()
    cache.lookups.clear()
    assert (await Solver(h2, cache).solve(top, make_job(events))).ref == "6"
    assert h2.runs == {}
    assert len(cache.lookups) == 1  # only the target is looked up: its inputs are not loaded
    # ... and yet every step is shown CACHED, inputs first, as BuildKit lists a cached build
    assert shown(events) == [("const 3", "CACHED"), ("add 2", "CACHED"), ("add 1", "CACHED")]


async def test_hits_over_shared_inputs_report_each_step_once_inputs_first() -> None:
    h = ArithmeticHandler()
    cache = CountingCache()
    base = const(1)
    left, right = add(10, base), add(20, base)
    top = add(100, left, right)
    await Solver(h, cache).solve(top, make_job())
    del cache.records[await Solver(h, cache).cache_key(top, make_job())]

    events: list[Event] = []
    h2 = ArithmeticHandler()
    assert (await Solver(h2, cache).solve(top, make_job(events))).ref == str(100 + 11 + 21)
    assert h2.runs == {top.digest: 1}
    assert shown(events) == [
        ("const 1", "CACHED"),
        ("add 10", "CACHED"),
        ("add 20", "CACHED"),
        ("add 100", "START"),
        ("add 100", "DONE"),
    ]


async def test_an_input_shown_cached_that_must_run_after_all_sends_its_real_events() -> None:
    h = ArithmeticHandler()
    cache = CountingCache()
    base = const(1)
    left, right = add(10, base), add(20, base)
    top = add(100, left, right)
    await Solver(h, cache).solve(top, make_job())
    # The records of base and right are gone (pruned): left's hit shows base
    # CACHED, then right needs base's result, so base really runs.
    for v in (top, right, base):
        del cache.records[await Solver(h, cache).cache_key(v, make_job())]

    events: list[Event] = []
    h2 = ArithmeticHandler()
    assert (await Solver(h2, cache).solve(top, make_job(events))).ref == str(100 + 11 + 21)
    assert h2.runs == {base.digest: 1, right.digest: 1, top.digest: 1}
    assert [state for name, state in shown(events) if name == "const 1"] == [
        "CACHED",
        "START",
        "DONE",
    ]
    assert [state for name, state in shown(events) if name == "add 10"] == ["CACHED"]
    assert [state for name, state in shown(events) if name == "add 20"] == ["START", "DONE"]


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


class FailFastHandler(ArithmeticHandler):
    """``fail`` vertices fail at once; every other run waits for ``gate``."""

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        args: tuple[str, ...] = getattr(vertex.op, "args", ())
        if args[:1] == ("fail",):
            self.runs[vertex.digest] = self.runs.get(vertex.digest, 0) + 1
            raise RuntimeError(f"vertex failed on purpose: {vertex.name}")
        return await super().run(vertex, inputs, job)


async def wait_until(cond: Callable[[], bool]) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 5 s")


async def test_failure_cancels_siblings_and_reports_error() -> None:
    h = FailFastHandler()
    h.gate = asyncio.Event()  # never set: the sibling runs until it is cancelled
    events: list[Event] = []
    slow_input = const(0)
    slow = add(1, slow_input)
    top = add(0, slow, fail("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(Solver(h, MemoryCacheIndex()).solve(top, make_job(events)), 5)
    # the sibling was running, was cancelled and had unwound when solve() returned;
    # nothing downstream of it or of the failure ran
    assert h.runs == {slow_input.digest: 1, fail("boom").digest: 1}
    assert h.active == 0
    assert ("const 0", "ERROR") in shown(events)
    cancelled = [e for e in events if isinstance(e, VertexStatus) and e.name == "const 0"]
    assert cancelled[-1].error == "cancelled"
    assert ("fail boom", "ERROR") in shown(events)
    assert not any(name in ("add 1", "add 0") for name, _ in shown(events))


async def test_cancelling_one_job_keeps_a_shared_run_alive_for_the_other() -> None:
    h = ArithmeticHandler()
    h.gate = asyncio.Event()
    solver = Solver(h, MemoryCacheIndex())
    v = add(7, const(0))
    first = asyncio.create_task(solver.solve(v, make_job()))
    second = asyncio.create_task(solver.solve(v, make_job()))
    await wait_until(lambda: h.active == 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert h.active == 1  # the shared run of const 0 goes on for the second job
    h.gate.set()
    assert (await second).ref == "7"
    assert h.runs == {const(0).digest: 1, v.digest: 1}  # nothing was run twice


async def test_cancelling_the_only_job_cancels_the_run() -> None:
    h = ArithmeticHandler()
    h.gate = asyncio.Event()
    events: list[Event] = []
    solver = Solver(h, MemoryCacheIndex())
    job = asyncio.create_task(solver.solve(add(1, const(0)), make_job(events)))
    await wait_until(lambda: h.active == 1)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert h.active == 0  # the run was unwound before solve() returned
    assert h.runs == {const(0).digest: 1}  # and what depended on it never started
    assert shown(events) == [("const 0", "START"), ("const 0", "ERROR")]


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
