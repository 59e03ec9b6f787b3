"""In-memory fakes of ociworker's Protocols, for unit tests.

Every fake here passes the same shared suite as the real implementation it
stands in for (see ``tests/test_cacheindex.py``), so a unit test that passes
with a fake says something about the real thing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ociworker.core.graph import Vertex
from ociworker.solver.scheduler import Job, Result, default_cache_key


class MemoryCacheIndex:
    def __init__(self) -> None:
        self.records: dict[str, tuple[Result, str]] = {}

    async def lookup(self, key: str) -> Result | None:
        hit = self.records.get(key)
        return hit[0] if hit else None

    async def record(self, key: str, result: Result, description: str) -> None:
        self.records[key] = (result, description)


class ArithmeticHandler:
    """Runs vertices whose op is ``ExecOp(args=("add", "N"))`` etc. on integer results.

    ``runs`` counts how many times each vertex digest actually ran, and ``gate``
    (when set) makes every run wait for it, so tests can observe concurrency.
    """

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.gate: asyncio.Event | None = None
        self.delay = 0.0

    def handler(self, vertex: Vertex) -> ArithmeticHandler:
        return self

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        return default_cache_key(vertex, input_keys)

    async def run(self, vertex: Vertex, inputs: Sequence[Result], job: Job) -> Result:
        self.runs[vertex.digest] = self.runs.get(vertex.digest, 0) + 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            op = vertex.op
            args: tuple[str, ...] = getattr(op, "args", ())
            values = [int(r.ref) if r.ref else 0 for r in inputs]
            if args[0] == "const":
                value = int(args[1])
            elif args[0] == "add":
                value = sum(values) + int(args[1])
            elif args[0] == "fail":
                raise RuntimeError(f"vertex failed on purpose: {args[1]}")
            else:
                raise ValueError(f"unknown arithmetic op {args!r}")
            return Result("snapshot", str(value))
        finally:
            self.active -= 1
