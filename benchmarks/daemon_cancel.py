"""Cancel -> clean latency of a build on the daemon (issue 5: within 1 s).

Starts ``ociworker serve`` on a temporary root and socket; each round starts a
build whose RUN sleeps, waits until the container's process exists, cancels
the client's build, and measures until (a) the daemon's Status stream reports
the build ended and (b) no process, runtime container or mount of it is left.

Needs root, runc and the local registry (scripts/setup-host).
Run: .venv/bin/python benchmarks/daemon_cancel.py [--rounds 5] [--runtime runc]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ociworker
from ociworker.core.progress import Event, VertexStatus
from ociworker.errors import BuildCancelled
from ociworker.testing.daemon import DaemonStartError, spawn_daemon


def procs_with(marker: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def mounts_under(root: Path) -> int:
    base = str(root.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sum(1 for line in f if line.split(" ")[4].startswith(base + "/"))


def containers(root: Path, runtime: str) -> str:
    state = root / "executor" / "runtime" / runtime
    out = subprocess.run(
        [runtime, "--root", str(state), "list", "-q"], capture_output=True, text=True
    )
    return out.stdout.strip()


async def one_round(
    addr: str, root: Path, work: Path, base: str, runtime: str
) -> tuple[float, float]:
    marker = f"bench-{uuid.uuid4().hex}"
    ctx = work / marker
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base}\nRUN sleep 60; echo {marker}\n")
    build_id = uuid.uuid4().hex
    async with ociworker.Client(addr) as c:
        running = asyncio.Event()

        def seen(ev: Event) -> None:
            if isinstance(ev, VertexStatus) and "RUN sleep" in ev.name:
                running.set()

        task = asyncio.create_task(c.build(ctx, events=seen, build_id=build_id))
        await running.wait()
        while not procs_with(marker):
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        task.cancel()
        try:
            async for _ in c.status(build_id):
                pass
        except BuildCancelled:
            pass
        reported = time.monotonic() - t0
        while procs_with(marker) or mounts_under(root) or containers(root, runtime):
            await asyncio.sleep(0.01)
        clean = time.monotonic() - t0
        await asyncio.gather(task, return_exceptions=True)
    return reported, clean


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", default="runc")
    ap.add_argument("--base", default="127.0.0.1:5000/busybox:latest")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root, sock = work / "root", work / "d.sock"
        try:
            daemon = spawn_daemon(
                ("--addr", f"unix://{sock}", "--root", str(root), "--runtime", args.runtime),
                work / "daemon.log",
            )
        except DaemonStartError as exc:
            print(exc, file=sys.stderr)
            return 1
        try:
            reported, clean = [], []
            for i in range(args.rounds):
                r, c = await one_round(f"unix://{sock}", root, work, args.base, args.runtime)
                reported.append(r)
                clean.append(c)
                print(f"round {i + 1}: build ended {r:.3f}s, all released {c:.3f}s")
            print(
                f"cancel -> Status end: median {statistics.median(reported):.3f}s "
                f"max {max(reported):.3f}s; cancel -> clean: median "
                f"{statistics.median(clean):.3f}s max {max(clean):.3f}s"
            )
        finally:
            daemon.terminate()
            daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
