"""Builds per minute of a small fleet on this host: 1, 2 and 3 daemons (issue 10).

Each configuration starts its daemons on fresh roots and sockets, then runs
the same workload through the CLI, ``--concurrency`` builds at a time:
``--rounds`` rounds over ``--projects`` small projects. A project is
``FROM busybox``, one ``RUN`` that hashes ``--work-mib`` MiB (its
"dependencies": about a CPU-second at the default here), ``COPY`` of its
sources and a ``RUN`` over them. Round 1 builds every project cold; each
later round changes one source file of every project, so the first RUN is
cached where the project built before and the second RUN runs again, as in
a day of commits.

``sticky`` is ``ociworker build --addr A --addr B ...`` (the fleet's pick);
``random`` gives each build one ``--addr`` drawn at random, what a plain load
balancer does: it shows what stickiness buys (cache hits) on the same daemons.

All daemons share this host's CPUs: the figures say what a fleet costs and
what sticky placement saves, not how N machines scale (see docs/scale-out.md).

Needs root, runc and the local registry (scripts/setup-host).
Run: .venv/bin/python benchmarks/fleet.py [--daemons 1,2,3] [--projects 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ociworker.testing.daemon import DaemonStartError, spawn_daemon


@dataclass(frozen=True)
class Outcome:
    seconds: float
    steps_run: int
    steps_cached: int


def write_project(work: Path, name: str, base: str, mib: int) -> Path:
    ctx = work / name
    (ctx / "src").mkdir(parents=True)
    (ctx / "src" / "main.txt").write_text(f"{name} v0\n")
    (ctx / "Dockerfile").write_text(
        f"FROM {base}\n"
        f"RUN head -c {mib * 1024 * 1024} /dev/zero | sha256sum > /deps.sum && "
        f"echo {name} >> /deps.sum\n"
        "COPY src /src\n"
        "RUN sha256sum /src/main.txt /deps.sum > /build.sum\n"
    )
    return ctx


def build(addrs: list[str], ctx: Path) -> Outcome:
    flags = [a for addr in addrs for a in ("--addr", addr)]
    cmd = [sys.executable, "-m", "ociworker", "build", *flags, "--progress", "plain", str(ctx)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"build of {ctx.name} failed:\n{proc.stderr[-3000:]}")
    runs = re.findall(r"^#(\d+) \[\d+/\d+\] RUN ", proc.stderr, re.M)
    cached = {n for n in re.findall(r"^#(\d+) CACHED", proc.stderr, re.M)}
    return Outcome(took, sum(1 for n in set(runs) if n not in cached), len(cached & set(runs)))


def workload(
    addrs: list[str], policy: str, projects: list[Path], rounds: int, concurrency: int
) -> tuple[float, list[Outcome]]:
    rng = random.Random(1)
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    for r in range(rounds):
        if r:
            for ctx in projects:
                (ctx / "src" / "main.txt").write_text(f"{ctx.name} v{r}\n")
        picks = [addrs if policy == "sticky" else [rng.choice(addrs)] for _ in projects]
        with ThreadPoolExecutor(concurrency) as pool:
            outcomes += pool.map(build, picks, projects)
    return time.monotonic() - t0, outcomes


def run_config(n: int, policy: str, args: argparse.Namespace) -> tuple[float, list[Outcome]]:
    with tempfile.TemporaryDirectory(prefix="ow-fleet-") as tmp:
        work = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(n):
                sock = work / f"w{i}.sock"
                cmd = ("--addr", f"unix://{sock}", "--root", str(work / f"root{i}"))
                procs.append(spawn_daemon(cmd, work / f"w{i}.log"))
            addrs = [f"unix://{work}/w{i}.sock" for i in range(n)]
            projects = [
                write_project(work, f"p{i}", args.base, args.work_mib) for i in range(args.projects)
            ]
            # the base image pulled once per daemon first: the table is about builds
            warm = write_project(work, "warm", args.base, 0)
            for addr in addrs:
                build([addr], warm)
            return workload(addrs, policy, projects, args.rounds, args.concurrency)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=120)


def row(n: int, policy: str, runs: list[tuple[float, list[Outcome]]]) -> str:
    rates = sorted(len(outs) / wall * 60 for wall, outs in runs)
    outs = runs[0][1]
    ran = sum(o.steps_run for o in outs)
    cached = sum(o.steps_cached for o in outs)
    median = statistics.median(o.seconds for _, outs in runs for o in outs)
    spread = f" ({rates[0]:.0f}-{rates[-1]:.0f})" if len(rates) > 1 else ""
    return (
        f"| {n} | {policy} | {len(outs)} | {statistics.median(rates):.1f}{spread} "
        f"| {median:.2f} | {ran} / {cached} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--daemons", default="1,2,3", help="fleet sizes to measure")
    ap.add_argument("--projects", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=3, help="builds at once")
    ap.add_argument("--random", action="store_true", help="also measure random placement")
    ap.add_argument("--work-mib", type=int, default=256, help="MiB the cacheable RUN hashes")
    ap.add_argument("-n", type=int, default=3, help="runs of each configuration")
    ap.add_argument("--base", default="127.0.0.1:5000/busybox:latest")
    args = ap.parse_args()
    print(
        f"{args.projects} projects x {args.rounds} rounds, {args.concurrency} builds at once, "
        f"{args.work_mib} MiB hashed; builds/min: median of {args.n} runs (min-max)"
    )
    print(
        "| daemons | placement | builds | builds/min | median build s "
        "| RUN steps run / cached | host load |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.daemons.split(",")):
        policies = ["sticky", "random"] if args.random and n > 1 else ["sticky"]
        for policy in policies:
            try:
                load = os.getloadavg()[0]
                runs = [run_config(n, policy, args) for _ in range(args.n)]
                # other work on the host skews a row: say how busy it was
                print(f"{row(n, policy, runs)} {load:.1f}-{os.getloadavg()[0]:.1f} |", flush=True)
            except (DaemonStartError, RuntimeError) as exc:
                print(f"| {n} | {policy} | failed: {exc} |", flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
