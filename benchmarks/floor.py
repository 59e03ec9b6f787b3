"""The runtime floor: what one trivial RUN costs us above a bare ``crun run`` (issue 17).

Three figures, each a median over --repeat runs, all on the same busybox-static rootfs as the
read-only lower of a fresh overlay (a fresh upper per run, as a RUN step gets):

  crun        ``crun run`` of a prepared bundle: the overlay is mounted and config.json
              written before the clock starts (the spec is ours, ``executor.spec.make_spec``
              for ``true`` on the host network, so it has the shape a RUN step's has, without
              the ptrace supervisor's seccomp listener, which needs our process)
  executor    ``OCIRuntimeExecutor.run`` of ``true`` (host network): bundle dir, overlay
              mount, user lookup, /etc files, step cgroup, spec, the runtime, clean-up
  build       per RUN step of a real build, embedded (``ociworker build --root``) and through
              the daemon (``ociworker serve`` + ``build --addr``), with the cache off:
                (time of a build with 1 + K ``RUN true`` steps - time with 1) / K
              so the build's fixed costs (start-up, solve, resolving the base, export) cancel,
              and so do the one-off costs of a process's first RUN (the executor's start,
              the ptrace supervisor), printed apart as (time with 1 - time with 0);
              each build is the median of --builds builds of that Dockerfile with --no-cache

"extra ms per RUN" = executor (or build per-RUN) minus crun; the issue's target is <= 15 ms.
The builds use the busybox base in the local registry (--base; primed before timing) and the
runtime given by --runtime (crun by default: the comparison is with crun's own floor).

Run as root: .venv/bin/python benchmarks/floor.py [--repeat 15] [--steps 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ociworker.core.mounts import Mount
from ociworker.executor import OCIRuntimeExecutor, ProcessSpec
from ociworker.executor.binary import find_runtime
from ociworker.executor.runtime import _nofile_limit
from ociworker.executor.spec import SpecOptions, make_spec
from ociworker.fs.mount import mount_all, unmount
from ociworker.testing.daemon import spawn_daemon

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BASE = "127.0.0.1:5000/busybox:latest"


def busybox_tree(dest: Path) -> Path:
    """A rootfs of busybox-static and its applets, with /etc/passwd and /etc/group."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("busybox-static is not installed (scripts/setup-host installs it)")
    (dest / "bin").mkdir(parents=True)
    (dest / "etc").mkdir()
    shutil.copy2(busybox, dest / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name != "busybox":
            (dest / "bin" / name).symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    return dest


def overlay(lower: Path, scratch: Path) -> list[Mount]:
    """The rootfs mount of a RUN step on ``lower``: a fresh upper and work dir in ``scratch``."""
    (scratch / "upper").mkdir(parents=True)
    (scratch / "work").mkdir()
    options = (f"lowerdir={lower}", f"upperdir={scratch / 'upper'}", f"workdir={scratch / 'work'}")
    return [Mount("overlay", "overlay", options)]


def time_bare(runtime: str, lower: Path, work: Path, i: int) -> float:
    """Seconds of one ``<runtime> run`` of a prepared bundle."""
    binary = find_runtime(runtime)
    bundle = work / f"bare-{runtime}-{i}"
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    for name in ("resolv.conf", "hosts"):
        shutil.copyfile(f"/etc/{name}", bundle / name)
    spec = make_spec(
        SpecOptions(
            args=("true",),
            isolated_network=False,
            # the limit the executor asks for (ours, where we may not raise it)
            nofile=_nofile_limit(),
            resolv_conf=str(bundle / "resolv.conf"),
            hosts=str(bundle / "hosts"),
        )
    )
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    mount_all(overlay(lower, work / f"bare-{runtime}-{i}-scratch"), rootfs)
    try:
        argv = [binary, f"--root={work / 'bare-state'}", "run", "--bundle", str(bundle)]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*argv, f"floor-{runtime}-{i}"], stdin=subprocess.DEVNULL, capture_output=True
        )
        seconds = time.perf_counter() - t0
    finally:
        unmount(rootfs)
    if proc.returncode != 0:
        raise SystemExit(f"{runtime} run failed: {proc.stderr.decode(errors='replace')}")
    return seconds


async def time_runs(runtime: str, lower: Path, work: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds of bare crun, bare runc and ``OCIRuntimeExecutor.run`` of ``true`` (host
    network), taking turns so the machine's drift hurts them alike."""
    executor = OCIRuntimeExecutor(work / "executor-state", runtime)
    out: list[bytes] = []
    times: dict[str, list[float]] = {"crun": [], "runc": [], "executor": []}
    try:
        for i in range(repeat + 1):
            rootfs = overlay(lower, work / f"exec-{runtime}-{i}")
            t0 = time.perf_counter()
            code = await executor.run(
                rootfs, ProcessSpec(args=("true",), network="host"), (), lambda _s, d: out.append(d)
            )
            seconds = time.perf_counter() - t0
            if code != 0:
                raise SystemExit(f"the executor's run of true exited {code}: {b''.join(out)!r}")
            if i:  # the first run starts the ptrace supervisor: a worker's one-off cost
                times["executor"].append(seconds)
                for bare in ("crun", "runc"):
                    times[bare].append(time_bare(bare, lower, work, i))
    finally:
        await executor.aclose()
    return times


def dockerfile(steps: int) -> str:
    return "ARG BASE\nFROM $BASE\n" + "RUN true\n" * steps


@contextmanager
def daemon(root: Path, logs: Path, runtime: str) -> Iterator[str]:
    sock = root.parent / "floor.sock"
    config = root.parent / "floor.toml"
    config.write_text('entitlements = ["network.host"]\n')
    args = (f"--addr=unix://{sock}", f"--root={root}", f"--config={config}", f"--runtime={runtime}")
    proc = spawn_daemon(args, logs / "floor-serve.log")
    try:
        yield f"unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def time_builds(
    steps: int, repeat: int, work: Path, base: str, runtime: str, addr: str | None
) -> dict[int, list[float]]:
    """Seconds of builds with 0, 1 and 1 + ``steps`` trivial RUN steps (cache off), by step
    count, interleaved so drift hurts them alike."""
    ctx = {n: work / f"ctx-{n}" for n in (0, 1, 1 + steps)}
    for n, d in ctx.items():
        d.mkdir(parents=True, exist_ok=True)
        (d / "Dockerfile").write_text(dockerfile(n))
    where = [f"--addr={addr}"] if addr else [f"--root={work / 'root'}", f"--runtime={runtime}"]
    head = [sys.executable, "-m", "ociworker", "build", *where, "--progress=quiet"]
    head += ["--network=host", "--allow=network.host", f"--build-arg=BASE={base}"]

    def build(n: int, *extra: str) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*head, *extra, str(ctx[n])], stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"build failed: {proc.stderr.decode(errors='replace')[-2000:]}")
        return time.perf_counter() - t0

    build(0)  # pulls the base: the timed builds find it
    times: dict[int, list[float]] = {n: [] for n in ctx}
    for _ in range(repeat):
        for n in ctx:
            times[n].append(build(n, "--no-cache"))
    return times


def median_ms(times: Sequence[float]) -> float:
    return 1000 * statistics.median(times)


def per_step_ms(zero: Sequence[float], many: Sequence[float], steps: int) -> float:
    """The marginal cost of one RUN step: the medians' difference over the step count."""
    return (median_ms(many) - median_ms(zero)) / steps


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeat", "-n", type=int, default=15, help="runs per figure (median)")
    p.add_argument("--builds", type=int, default=5, help="builds per Dockerfile (median)")
    p.add_argument("--steps", type=int, default=20, help="K: RUN steps of the long build")
    p.add_argument("--runtime", default="crun", help="the worker's runtime (crun, runc)")
    p.add_argument("--base", default=DEFAULT_BASE, help="base image of the builds")
    p.add_argument("--no-builds", action="store_true", help="only crun and the executor")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("floor.py needs root (mounts, the runtime)")

    work = Path(tempfile.mkdtemp(prefix="ocifloor-", dir="/var/tmp"))
    figures: dict[str, float | str | int] = {"runtime": args.runtime, "steps": args.steps}
    try:
        lower = busybox_tree(work / "lower")
        runs = asyncio.run(time_runs(args.runtime, lower, work, args.repeat))
        floor, runc, ex = (median_ms(runs[k]) for k in ("crun", "runc", "executor"))
        figures.update(crun_run_ms=floor, runc_run_ms=runc, executor_run_ms=ex)
        figures["executor_extra_ms"] = ex - floor
        print(f"bare crun run           {floor:8.1f} ms (median of {args.repeat})")
        print(f"bare runc run           {runc:8.1f} ms")
        print(
            f"executor run ({args.runtime:<4})     {ex:8.1f} ms  -> +{ex - floor:.1f} ms over crun"
        )
        if not args.no_builds:
            logs = work / "logs"
            logs.mkdir()
            emb = time_builds(args.steps, args.builds, work / "emb", args.base, args.runtime, None)
            droot = work / "daemon" / "root"
            droot.mkdir(parents=True)
            with daemon(droot, logs, args.runtime) as addr:
                dae = time_builds(args.steps, args.builds, work / "daemon", args.base, "", addr)
            k = args.steps
            for label, t in (("embedded", emb), ("daemon", dae)):
                step = per_step_ms(t[1], t[1 + k], k)
                first = median_ms(t[1]) - median_ms(t[0])
                figures.update(
                    {
                        f"{label}_build0_ms": median_ms(t[0]),
                        f"{label}_build1_ms": median_ms(t[1]),
                        f"{label}_build1K_ms": median_ms(t[1 + k]),
                        f"{label}_per_run_ms": step,
                        f"{label}_extra_ms": step - floor,
                        f"{label}_first_run_ms": first,
                    }
                )
                print(
                    f"build per RUN, {label:<8} {step:8.1f} ms  -> +{step - floor:.1f} ms over"
                    f" crun (1 step {median_ms(t[1]):.0f} ms, {1 + k} steps"
                    f" {median_ms(t[1 + k]):.0f} ms, median of {args.builds}); the first RUN"
                    f" {first:.0f} ms (0 steps {median_ms(t[0]):.0f} ms)"
                )
    finally:
        for point in sorted(
            (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()),
            key=len,
            reverse=True,
        ):
            if point.startswith(str(work) + "/"):
                subprocess.run(["umount", "--lazy", point], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
