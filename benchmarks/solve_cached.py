"""A cached solve of a 10,000-vertex graph by the real scheduler and cache index (issue 17).

The graph: --width chains of --depth ``RUN``-like exec vertices each (every vertex a distinct
``sh -c 'echo C.D'`` on its chain's previous one, the first on scratch), joined by one merge
vertex: width x depth + 1 vertices (10,001 by default).

The worker is real (``open_worker`` on a fresh root: the op handlers' cache keys, the SQLite
cache index in WAL mode, the overlay snapshotter that validates every hit). Running 10,000
containers to fill the cache would take far longer than the measurement, so the cache is
primed the way a run leaves it, minus the container: the first pass computes every vertex's
key with the real handlers (``Solver.cache_key``), then each vertex gets a real committed
snapshot (empty, prepared on its input's snapshot, so the chains have the parents a build
makes) and a record under its key (``SQLiteCacheIndex.record``), in topological order.
The worker is then closed and opened again (a fresh SQLite connection, as a new build
process has), and the graph solved --repeat times, each a new ``Job`` with a sink that keeps
every progress event. Printed: the priming cost, each timed solve, their median, the cache
lookups one solve made and the events it sent (every vertex reported CACHED). A solve computes
all 10,001 keys (the handlers', inputs first) and then looks up the target: its hit answers
for every ancestor, which is reported CACHED without a lookup of its own (as BuildKit does),
so one solve is one lookup, one snapshot stat and 10,001 events. Priming takes minutes (a
committed snapshot costs a few ms); it is not part of the figure.

The target is < 1 s. Run as root: .venv/bin/python benchmarks/solve_cached.py [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.core.graph import ExecOp, MergeOp, Vertex
from ociworker.core.progress import VertexStatus
from ociworker.solver.scheduler import Job, Result
from ociworker.worker import Worker, WorkerConfig, open_worker


def make_graph(width: int, depth: int) -> tuple[Vertex, list[Vertex]]:
    """The merge vertex on top of ``width`` chains of ``depth`` exec vertices, and every
    vertex in topological order (inputs first)."""
    order: list[Vertex] = []
    tops: list[Vertex | None] = []
    for c in range(width):
        prev: Vertex | None = None
        for d in range(depth):
            op = ExecOp(args=("sh", "-c", f"echo {c}.{d} >> /log"))
            prev = Vertex(op, (prev,), name=f"[chain-{c} {d + 1}/{depth}] RUN echo {c}.{d}")
            order.append(prev)
        tops.append(prev)
    top = Vertex(MergeOp(), tuple(tops), name="merge")
    order.append(top)
    return top, order


class Events:
    """A progress sink that keeps the events (a client would render them)."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def __call__(self, event: object) -> None:
        self.events.append(event)

    def cached(self) -> int:
        return sum(1 for e in self.events if isinstance(e, VertexStatus) and e.cached)


async def prime(worker: Worker, order: Sequence[Vertex]) -> tuple[float, float]:
    """Every vertex's key (real handlers), a real committed snapshot and a cache record for
    each; the seconds of the keys pass and of the snapshots + records pass."""
    job = Job(id="prime")
    t0 = time.perf_counter()
    await worker.solver.cache_key(order[-1], job)
    t1 = time.perf_counter()
    snapshot_of: dict[object, str] = {}
    for i, v in enumerate(order):
        parents = [snapshot_of[p.digest] for p in v.inputs if p is not None]
        name = f"bench-solve-{i}"
        active = name + "-active"
        # a merge's real snapshot sits on its inputs' layers; one parent is the same cost
        await worker.snapshots.prepare(active, parents[0] if parents else None)
        await worker.snapshots.commit(name, active)
        snapshot_of[v.digest] = name
        await worker.cache.record(job.keys[v.digest], Result("snapshot", name), v.name)
    return t1 - t0, time.perf_counter() - t1


@dataclass
class Counting:
    """Counts the cache index's lookups of one solve (the real index does the work)."""

    worker: Worker
    lookups: int = 0

    def __post_init__(self) -> None:
        index = self.worker.cache
        real = index.lookup

        async def lookup(key: str) -> Result | None:
            self.lookups += 1
            return await real(key)

        index.lookup = lookup  # type: ignore[method-assign]


async def run(args: argparse.Namespace, root: Path) -> dict[str, object]:
    config = WorkerConfig(root=root)
    top, order = make_graph(args.width, args.depth)
    worker = open_worker(config)
    try:
        keys_s, prime_s = await prime(worker, order)
    finally:
        await worker.aclose()
    print(f"graph: {len(order)} vertices ({args.width} chains of {args.depth} + a merge)")
    print(f"priming: keys {keys_s:.2f}s, {len(order)} snapshots + records {prime_s:.2f}s")

    worker = open_worker(config)
    try:
        counter = Counting(worker)
        times, sinks = [], []
        for i in range(args.repeat):
            sink = Events()
            counter.lookups = 0
            t0 = time.perf_counter()
            result = await worker.solver.solve(top, Job(id=f"cached-{i}", events=sink))
            times.append(time.perf_counter() - t0)
            sinks.append(sink)
            if result.kind != "snapshot" or sink.cached() != len(order):
                raise SystemExit(
                    f"solve {i} was not all cache hits: {result}, {sink.cached()} cached events"
                )
            print(f"cached solve {i + 1}: {times[-1]:.3f}s ({counter.lookups} lookups)")
    finally:
        await worker.aclose()
    median = statistics.median(times)
    print(f"median cached solve: {median:.3f}s (target < 1 s)")
    return {
        "vertices": len(order),
        "prime_keys_s": keys_s,
        "prime_records_s": prime_s,
        "cached_solve_s": times,
        "cached_solve_median_s": median,
        "lookups_per_solve": counter.lookups,
        "events_per_solve": len(sinks[-1].events),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--width", type=int, default=100, help="chains")
    p.add_argument("--depth", type=int, default=100, help="vertices per chain")
    p.add_argument("--repeat", "-n", type=int, default=5, help="timed cached solves")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("solve_cached.py needs root (the worker's overlay snapshotter)")
    root = Path(tempfile.mkdtemp(prefix="ocisolve-", dir="/var/tmp"))
    try:
        figures = asyncio.run(run(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
