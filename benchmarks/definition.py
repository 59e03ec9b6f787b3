"""Encode and decode a graph.v1 definition of N vertices (both forms), and refuse a
hostile one of 10^6 vertices; print seconds, sizes and peak memory of each phase.

Run: .venv/bin/python benchmarks/definition.py [VERTICES]   (default 100,000: the limit)

The graph is a chain of RUN steps over a base image with a COPY from the context every
tenth step (what a long Dockerfile makes); each vertex is digested once by the encoder,
and every stated digest is recomputed by the decoder.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from ociworker.core.graph import Copy, ExecOp, FileOp, SourceOp, Vertex
from ociworker.definition import DefinitionError, decode, encode


def make(n: int) -> Vertex:
    base = Vertex(SourceOp("docker-image://reg/base@sha256:" + "a" * 64), name="FROM base")
    ctx = Vertex(SourceOp("local://context"))
    v = base
    env = ("PATH=/usr/bin:/bin", "HOME=/root")
    for i in range(n - 2):
        if i % 10 == 9:
            v = Vertex(FileOp((Copy(1, f"/src{i}", "/dst/"),)), (v, ctx), name=f"COPY {i}")
        else:
            v = Vertex(
                ExecOp(("/bin/sh", "-c", f"echo {i} > /f{i}"), env=env), (v,), name=f"RUN {i}"
            )
    return v


def measure(label: str, fn: Callable[[], Any], *, memory: bool = False) -> Any:
    """Seconds of ``fn`` (and, with ``memory``, its peak allocation, traced in a
    second run: tracing slows Python down several times). The protobuf
    library's own allocations are not traced: the last line's peak RSS has them."""
    t = time.perf_counter()
    try:
        out = fn()
    except DefinitionError as exc:
        out = exc
    took = time.perf_counter() - t
    peak = ""
    if memory:
        tracemalloc.start()
        with contextlib.suppress(DefinitionError):
            fn()
        peak = f"  peak {tracemalloc.get_traced_memory()[1] / 2**20:6.1f} MiB"
        tracemalloc.stop()
    print(f"{label:<34} {took:8.3f} s{peak}")
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    target = measure(f"build graph ({n} vertices)", lambda: make(n))
    for fmt in ("pb", "json"):
        data = measure(f"encode {fmt}", lambda fmt=fmt: encode(target, None, fmt))
        print(f"{'':<34} {len(data) / 2**20:8.1f} MiB")
        got = measure(f"decode {fmt} (all checks)", lambda data=data: decode(data), memory=True)
        assert got.target is not None and got.target.digest == target.digest
    hostile = b"\x0a\x08graph.v1" + b"\x12\x00" * 1_000_000
    err = measure("refuse 10^6 vertices (pb)", lambda: decode(hostile), memory=True)
    assert isinstance(err, DefinitionError), err
    hostile = b'{"version":"graph.v1","vertices":[' + b",".join([b"{}"] * 1_000_000) + b"]}"
    err = measure("refuse 10^6 vertices (json)", lambda: decode(hostile), memory=True)
    assert isinstance(err, DefinitionError), err
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"{'peak RSS of the whole run':<34} {peak:8.1f} MiB")


if __name__ == "__main__":
    main()
