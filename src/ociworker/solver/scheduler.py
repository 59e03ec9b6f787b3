"""The asyncio scheduler.

It knows vertices, cache keys and results, and nothing about runc, snapshots or
Dockerfiles: ops are run by handlers behind the ``OpHandler`` Protocol, and past
results are found through the ``CacheIndex`` Protocol. That is what lets the
unit tests drive it with arithmetic vertices.

Rules it keeps:
- a vertex's inputs are solved concurrently; siblings of a failed vertex are
  cancelled (TaskGroup), as a build fails as a whole;
- a cache key seen before (index hit) never runs again, and its inputs are not
  even solved: they are only reported CACHED (each once, inputs first), as
  BuildKit lists every step of a cached build;
- identical work runs once: within a job by vertex digest, across concurrent
  jobs by cache key. A shared run is cancelled only when every job waiting on it
  is gone, so one client's Ctrl-C never breaks another's build;
- an imported cache (``Job.imported``, a ``CacheSource``) is asked after the
  local index. Its results are lazy (kind ``remote``): a hit costs nothing until
  a step that runs needs it as an input, then it is materialized (downloaded and
  unpacked) once. A record is used only when its inputs are known too, either
  from the same import (checked before solving them) or because they were solved
  in this job, as BuildKit links imported records from the sources up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from ociworker.core.digest import Digest, digest_of
from ociworker.core.graph import Vertex
from ociworker.core.progress import EventSink, VertexStatus, discard
from ociworker.core.session import (
    Credentials,
    NoCredentials,
    NoSecrets,
    NoSSH,
    Secrets,
    SSHAgents,
)
from ociworker.errors import HostError, os_error_text

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    """What a vertex produced: a committed snapshot, a local dir, or nothing (scratch)."""

    kind: str  # "snapshot" | "dir" | "none"
    ref: str = ""


SCRATCH = Result("none")
#: the kind of a result found in an imported cache and not yet materialized; its
#: ref is the cache key it was found under
REMOTE = "remote"


class CacheSource(Protocol):
    """A build cache imported for one job (``--cache-from``)."""

    def knows(self, key: str) -> bool:
        """Whether ``key`` has a record (of any kind) in the import."""
        ...

    async def lookup(self, key: str) -> Result | None:
        """A lazy result (kind ``REMOTE``, or SCRATCH) for ``key``, or None."""
        ...

    async def materialize(self, result: Result) -> Result:
        """The snapshot of a ``REMOTE`` result: its layers fetched and unpacked."""
        ...


@dataclass
class Job:
    """One build's view of the solver: its events, its flags, its local sources."""

    id: str
    events: EventSink = discard
    no_cache: bool = False
    #: name -> directory for ``local://NAME`` sources, filled by the session
    locals: dict[str, object] = field(default_factory=dict)
    #: what the client lends to ``RUN --mount=type=secret|ssh``
    secrets: Secrets = field(default_factory=NoSecrets)
    ssh: SSHAgents = field(default_factory=NoSSH)
    #: registry credentials for this job's pulls (never shared with other jobs)
    credentials: Credentials = field(default_factory=NoCredentials)
    #: called with each vertex's result as it becomes known (run or cache hit),
    #: e.g. to stream a step's layer before the build ends
    on_result: Callable[[Vertex, Result], None] | None = None
    #: entitlements the build asked for (``BuildRequest.allow``)
    entitlements: tuple[str, ...] = ()
    #: the caches this build imports (``--cache-from``), asked after the local index
    imported: CacheSource | None = None
    #: vertex digest -> cache key and -> result, as this job found them (the
    #: cache export reads them; ancestors of a hit have a key and no result)
    keys: dict[Digest, str] = field(default_factory=dict)
    results: dict[Digest, Result] = field(default_factory=dict)


class OpHandler(Protocol):
    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        """The key under which this vertex's result is remembered."""
        ...

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result: ...


@runtime_checkable
class Preparing(Protocol):
    def will_run(self, vertex: Vertex, job: Job) -> None:
        """``vertex`` missed the cache and runs once its inputs are solved: start
        (in the background, never failing) what it will need, so that work
        overlaps the wait for its inputs."""
        ...


class Resolver(Protocol):
    def handler(self, vertex: Vertex) -> OpHandler: ...


class CacheIndex(Protocol):
    async def lookup(self, key: str) -> Result | None:
        """A still-valid result for ``key``, or None."""
        ...

    async def record(self, key: str, result: Result, description: str) -> None: ...


def default_cache_key(vertex: Vertex, input_keys: Sequence[str]) -> Digest:
    return digest_of({"op": vertex.op.to_json(), "inputs": list(input_keys)})


class _SharedRun:
    """A run of one cache key that several jobs may be waiting on."""

    def __init__(self, task: asyncio.Task[Result]) -> None:
        self.task = task
        self.waiters = 0


class Solver:
    def __init__(
        self, resolver: Resolver, cache: CacheIndex, max_parallelism: int | None = None
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._limit = asyncio.Semaphore(max_parallelism) if max_parallelism else None
        self._running: dict[str, _SharedRun] = {}

    async def solve(self, target: Vertex | None, job: Job) -> Result:
        if target is None:
            return SCRATCH
        run = _JobRun(self, job)
        try:
            return await run.result(target)
        finally:
            await run.close()

    async def materialize(self, result: Result, job: Job) -> Result:
        """A solve's result as files (a lazy imported result is fetched and
        unpacked), for outputs that read them."""
        run = _JobRun(self, job)
        try:
            return await run.materialize(result)
        finally:
            await run.close()

    async def cache_key(self, target: Vertex, job: Job) -> str:
        run = _JobRun(self, job)
        try:
            return await run.key(target)
        finally:
            await run.close()

    # -- shared across jobs --------------------------------------------------

    async def _run_shared(
        self, key: str, vertex: Vertex, inputs: Sequence[Result], job: Job
    ) -> Result:
        shared = self._running.get(key)
        if shared is None:
            task = asyncio.get_running_loop().create_task(self._run(key, vertex, inputs, job))
            shared = _SharedRun(task)
            self._running[key] = shared
            task.add_done_callback(functools.partial(self._forget, key))
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task)
        except asyncio.CancelledError:
            # This waiter is gone; the run dies only with its last waiter.
            if shared.waiters == 1 and not shared.task.done():
                shared.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await shared.task
            raise
        finally:
            shared.waiters -= 1

    def _forget(self, key: str, _task: asyncio.Task[Result]) -> None:
        self._running.pop(key, None)

    async def _run(self, key: str, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        handler = self._resolver.handler(vertex)
        if self._limit is None:
            result = await handler.run(vertex, inputs, job)
        else:
            async with self._limit:
                result = await handler.run(vertex, inputs, job)
        await self._cache.record(key, result, vertex.name)
        return result


class _JobRun:
    """Memoises keys and results by vertex digest for one solve call."""

    def __init__(self, solver: Solver, job: Job) -> None:
        self._solver = solver
        self._job = job
        self._keys: dict[Digest, asyncio.Future[str]] = {}
        self._results: dict[Digest, asyncio.Future[Result]] = {}
        #: vertices this job has already shown (cached, or started for real)
        self._reported: set[Digest] = set()
        self._linked: dict[Digest, asyncio.Future[bool]] = {}
        self._materialized: dict[str, asyncio.Future[Result]] = {}

    async def close(self) -> None:
        """Cancel whatever this job still has running and wait for it to unwind,
        so containers and mounts are released before solve() returns."""
        futures: list[asyncio.Future[Any]] = [
            *self._keys.values(),
            *self._results.values(),
            *self._linked.values(),
            *self._materialized.values(),
        ]
        pending = [f for f in futures if not f.done()]
        for f in pending:
            f.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for f in futures:
            if f.done() and not f.cancelled():
                f.exception()  # mark retrieved: the error already reached the caller

    async def key(self, v: Vertex) -> str:
        fut = self._keys.get(v.digest)
        if fut is None:
            fut = asyncio.ensure_future(self._compute_key(v))
            self._keys[v.digest] = fut
        return await asyncio.shield(fut)

    async def _compute_key(self, v: Vertex) -> str:
        input_keys = await self._gather([self.key(i) for i in v.inputs if i is not None])
        it = iter(input_keys)
        keys = [next(it) if i is not None else "" for i in v.inputs]
        key = await self._solver._resolver.handler(v).cache_key(v, keys, self._job)
        self._job.keys[v.digest] = key
        return key

    async def result(self, v: Vertex) -> Result:
        fut = self._results.get(v.digest)
        if fut is None:
            fut = asyncio.ensure_future(self._compute_result(v))
            self._results[v.digest] = fut
        return await asyncio.shield(fut)

    async def _compute_result(self, v: Vertex) -> Result:
        job = self._job
        key = await self.key(v)
        use_cache = not (job.no_cache or v.ignore_cache)
        if use_cache:
            hit = await self._solver._cache.lookup(key)
            if hit is None and job.imported is not None and await self._is_linked(v):
                hit = await job.imported.lookup(key)
            if hit is not None:
                self._report_cached(v)
                return self._found(v, hit)
        handler = self._solver._resolver.handler(v)
        preparing = handler if isinstance(handler, Preparing) else None
        if preparing is not None and not (use_cache and job.imported is not None):
            preparing.will_run(v, job)
        inputs = await self._gather(
            [self.result(i) if i is not None else _scratch() for i in v.inputs]
        )
        if use_cache and job.imported is not None:
            # Its inputs are known now (solved here): the import's record of v is
            # linked through them, as BuildKit matches a record by its inputs.
            hit = await job.imported.lookup(key)
            if hit is not None:
                self._report_cached(v)
                return self._found(v, hit)
            if preparing is not None:  # known to run only now
                preparing.will_run(v, job)
        # Only a step that runs needs its inputs' files.
        inputs = await self._gather([self._materialize(r) for r in inputs])
        started = time.time()
        # A vertex reported cached through a hit above it still sends its real
        # events when another path needs it and its record is gone.
        self._reported.add(v.digest)
        job.events(VertexStatus(v.digest, v.name, started=started))
        try:
            result = await self._solver._run_shared(key, v, inputs, job)
        except asyncio.CancelledError:
            job.events(
                VertexStatus(v.digest, v.name, started, completed=time.time(), error="cancelled")
            )
            raise
        except Exception as exc:
            host = _host_error(v, exc)
            job.events(
                VertexStatus(
                    v.digest, v.name, started, completed=time.time(), error=str(host or exc)
                )
            )
            if host is not None:
                raise host from exc
            raise
        job.events(VertexStatus(v.digest, v.name, started=started, completed=time.time()))
        return self._found(v, result)

    def _found(self, v: Vertex, result: Result) -> Result:
        self._job.results[v.digest] = result
        if self._job.on_result is not None:
            self._job.on_result(v, result)
        return result

    async def _is_linked(self, v: Vertex) -> bool:
        """Whether every input of ``v`` has a record in the import, recursively
        (scratch inputs need none), so its record may be used before they are solved."""
        fut = self._linked.get(v.digest)
        if fut is None:
            fut = asyncio.ensure_future(self._compute_linked(v))
            self._linked[v.digest] = fut
        return await asyncio.shield(fut)

    async def _compute_linked(self, v: Vertex) -> bool:
        imported = self._job.imported
        assert imported is not None
        for i in v.inputs:
            if i is None:
                continue
            if not imported.knows(await self.key(i)) or not await self._is_linked(i):
                return False
        return True

    async def materialize(self, result: Result) -> Result:
        """``result`` as files: a lazy imported result is fetched and unpacked
        (once per job) and remembered in the local index under its key."""
        return await self._materialize(result)

    async def _materialize(self, result: Result) -> Result:
        if result.kind != REMOTE:
            return result
        fut = self._materialized.get(result.ref)
        if fut is None:
            fut = asyncio.ensure_future(self._compute_materialized(result))
            self._materialized[result.ref] = fut
        return await asyncio.shield(fut)

    async def _compute_materialized(self, result: Result) -> Result:
        imported = self._job.imported
        assert imported is not None
        real = await imported.materialize(result)
        await self._solver._cache.record(result.ref, real, "imported from the build cache")
        return real

    def _report_cached(self, v: Vertex) -> None:
        """Report ``v`` and every ancestor a hit on it makes unnecessary as CACHED,
        inputs before their users (the walk's order), each once per job.

        The ancestors are not looked up, loaded or run: the user sees the whole
        build, as BuildKit shows it, for the price of events only.
        """
        now = time.time()
        # Post-order, inputs in their order. A reported vertex's ancestors are all
        # reported already (it was reported this way, or it started after its
        # inputs were solved), so the walk stops there: many hits over one long
        # chain cost one pass over it, not one per hit.
        stack: list[tuple[Vertex, bool]] = [(v, False)]
        while stack:
            u, expanded = stack.pop()
            if u.digest in self._reported:
                continue
            if expanded:
                self._reported.add(u.digest)
                self._job.events(
                    VertexStatus(u.digest, u.name, started=now, completed=now, cached=True)
                )
                continue
            stack.append((u, True))
            stack.extend((i, False) for i in reversed(u.inputs) if i is not None)

    @staticmethod
    async def _gather(aws: Sequence[Awaitable[T]]) -> list[T]:
        if not aws:
            return []
        if len(aws) == 1:
            return [await aws[0]]
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(_as_coro(a)) for a in aws]
        except BaseExceptionGroup as group:
            # The build fails with the first real error, not a wrapper around it.
            raise _first_error(group) from None
        return [t.result() for t in tasks]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


async def _as_coro(aw: Awaitable[T]) -> T:
    return await aw


#: what the host ran out of or broke under a step (its disk, its memory), as
#: opposed to a bug: the user reads which step it hit, in words
_HOST_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM})


def _host_error(v: Vertex, exc: Exception) -> HostError | None:
    """A full disk (or the like) met by a step's own IO, named by its step as
    ExecError names it: ``step [2/2] COPY big /big: no space left on device``."""
    if isinstance(exc, OSError) and exc.errno in _HOST_ERRNOS:
        return HostError(f"step {v.name}: {os_error_text(exc)}")
    return None


async def _scratch() -> Result:
    return SCRATCH
