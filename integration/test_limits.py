"""Per-step resource limits (issue 11, item 3) through the CLI and the daemon, on runc and
crun: a fork bomb and a memory hog fail naming the limit they hit, the next build still
works, a build's --ulimit/--shm-size reach the step (and may not exceed the worker's
limits), and no cgroup of a step is left after the build, a SIGTERM, or a SIGKILL and
restart of the daemon."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import LEGS_MARK
from ociworker.testing.daemon import spawn_daemon
from test_build import ow, runtime_containers, write_context

pytestmark = LEGS_MARK


# why the rootless leg skips a test
_CG = (
    "a rootless step gets cgroup limits only in a cgroup delegated to the user (systemd's "
    "user@.service); the test user, run by runuser, has none, so no limit would hold"
)
_CGDIR = "it reads the step's cgroup dirs from the host, and runs the worker as root"


def _build(
    root: Path, runtime: str, ctx: Path, *extra: str, check: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return ow(
        root,
        "build",
        "--progress",
        "plain",
        "--runtime",
        runtime,
        *extra,
        str(ctx),
        check=check,
        timeout=timeout,
    )


def _hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 and v2), read from mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[0] in ("cgroup", "cgroup2"):
            out.append(Path(pre.split()[4]))
    return out


def _procs_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd:
                found.append(int(pid))
    return found


def _wait_for_step(marker: str, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 120
    while not (pids := _procs_with(marker)):
        assert time.monotonic() < deadline and proc.poll() is None, "the step never started"
        time.sleep(0.05)
    return pids[0]


def _cgroup_dirs_of(pid: int) -> list[Path]:
    """The top-level cgroup dir holding ``pid`` on every hierarchy, from the kernel's
    own /proc/PID/cgroup (e.g. ``4:memory:/ociw-.../ctr`` -> <memory mount>/ociw-...)."""
    tops = set()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        path = line.split(":", 2)[2]
        first = path.strip("/").split("/")[0]
        if first:
            tops.add(first)
    assert tops, f"process {pid} is in no cgroup of its own"
    return [h / top for h in _hierarchies() for top in tops if (h / top).exists()]


@pytest.mark.rootless_skip(_CG)
def test_fork_bomb_fails_naming_the_pids_limit_and_the_next_build_works(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = tmp_path / "root"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN f(){{ f | f & }}; f; sleep 60\n")
    # the base image pulled first: the time below is the fork bomb's step alone
    warm = write_context(tmp_path, f"FROM {base_image}\nRUN true\n", name="warm")
    _build(root, runtime, warm, check=True)
    start = time.monotonic()
    proc = _build(root, runtime, ctx, "--step-pids", "128", "--no-cache")
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    # behaviour, not speed: the step was stopped, not waited out (its own
    # `sleep 60` would have ended it at 60 s)
    assert took < 60, f"the fork bomb ran {took:.1f}s"
    # Killed by us once a fork is refused (137), or, when the bomb's shell gave up
    # by itself between two samples, its own exit code: the limit is named either way.
    assert re.search(
        re.escape(
            "ERROR: failed to solve: step [2/2] RUN f(){ f | f & }; f; sleep 60: "
            "process '/bin/sh -c f(){ f | f & }; f; sleep 60' did not complete successfully: "
        )
        + r"exit code: (137: killed|\d+): pids limit 128 reached",
        proc.stderr,
    ), proc.stderr[-3000:]
    ok = write_context(tmp_path, f"FROM {base_image}\nRUN echo after-bomb\n", name="ok")
    after = _build(root, runtime, ok, "--step-pids", "128")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "after-bomb" in after.stderr
    assert runtime_containers(root, runtime) == ""


@pytest.mark.rootless_skip(_CG)
def test_memory_hog_fails_naming_the_memory_limit_and_the_next_build_works(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = tmp_path / "root"
    # dd allocates its 1 GiB block before reading into it
    ctx = write_context(
        tmp_path, f"FROM {base_image}\nRUN dd if=/dev/zero of=/dev/null bs=1G count=1\n"
    )
    proc = _build(root, runtime, ctx, "--step-memory", "256m")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        "did not complete successfully: exit code: 137: killed: memory limit 256MiB reached"
    ) in proc.stderr
    assert "#4 ERROR: step [2/2] RUN dd if=/dev/zero of=/dev/null bs=1G count=1" in proc.stderr
    # The same allocation fits a worker with room for it.
    after = _build(root, runtime, ctx, "--step-memory", "2g")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "1+0 records out" in after.stderr


def test_ulimit_and_shm_size_reach_the_step(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\n"
        "RUN ulimit -Sn > /nofile_soft; ulimit -Hn > /nofile_hard; ulimit -u > /nproc; "
        "df -k /dev/shm | tail -n 1 | awk '{print $2}' > /shm_kib\n",
    )
    out = tmp_path / "out"
    proc = _build(
        tmp_path / "root",
        runtime,
        ctx,
        "--ulimit",
        "nofile=1024:2048",
        "--ulimit",
        "nproc=100",
        "--shm-size",
        "32m",
        "-o",
        f"type=local,dest={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {f: (out / f).read_text().strip() for f in ("nofile_soft", "nofile_hard", "nproc")}
    assert got == {"nofile_soft": "1024", "nofile_hard": "2048", "nproc": "100"}
    assert (out / "shm_kib").read_text().strip() == str(32 * 1024)


def test_a_build_cannot_raise_the_workers_limits(tmp_path: Path, require_root: None) -> None:
    ctx = write_context(tmp_path, "FROM scratch\n")
    root = tmp_path / "root"
    proc = ow(root, "build", "--step-pids", "128", "--ulimit", "nproc=1000", str(ctx), check=False)
    assert proc.returncode != 0
    assert "--ulimit nproc=1000:1000: above the worker's step pids limit 128" in proc.stderr
    proc = ow(root, "build", "--step-memory", "64m", "--shm-size", "1g", str(ctx), check=False)
    assert proc.returncode != 0
    assert f"--shm-size {1 << 30}: above the worker's step memory limit {64 << 20}" in proc.stderr
    proc = ow(root, "build", "--ulimit", "files=10", str(ctx), check=False)
    assert proc.returncode != 0
    assert "invalid --ulimit 'files=10'" in proc.stderr


@pytest.mark.rootless_skip(_CGDIR)
def test_no_step_cgroup_is_left_after_a_build_or_a_sigterm(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    root = tmp_path / "root"
    marker = f"cg-{uuid.uuid4().hex}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 1; echo {marker}\n")
    cmd = [sys.executable, "-m", "ociworker", "build", "--root", str(root)]
    proc = subprocess.Popen(
        [*cmd, "--runtime", runtime, str(ctx)], stderr=subprocess.PIPE, text=True
    )
    dirs = _cgroup_dirs_of(_wait_for_step(marker, proc))
    assert dirs
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert [d for d in dirs if d.exists()] == []

    marker = f"cg-{uuid.uuid4().hex}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 60; echo {marker}\n", name="c2")
    proc = subprocess.Popen(
        [*cmd, "--runtime", runtime, str(ctx)], stderr=subprocess.PIPE, text=True
    )
    dirs = _cgroup_dirs_of(_wait_for_step(marker, proc))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert _procs_with(marker) == []
    assert [d for d in dirs if d.exists()] == []


@pytest.mark.rootless_skip(_CGDIR)
def test_no_step_cgroup_is_left_after_a_sigkill_and_restart(
    runtime: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    root, sock = tmp_path / "droot", tmp_path / "d.sock"
    args = ("--addr", f"unix://{sock}", "--root", str(root), "--runtime", runtime)
    daemon = spawn_daemon(args, tmp_path / "d1.log")
    marker = f"cg-{uuid.uuid4().hex}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sleep 60; echo {marker}\n")
    client = subprocess.Popen(
        [sys.executable, "-m", "ociworker", "build", "--addr", f"unix://{sock}", str(ctx)],
        stderr=subprocess.PIPE,
        text=True,
    )
    dirs = _cgroup_dirs_of(_wait_for_step(marker, client))
    daemon.kill()
    daemon.wait()
    client.communicate(timeout=60)
    daemon = spawn_daemon(args, tmp_path / "d2.log")  # recovers the state dir
    try:
        assert _procs_with(marker) == []
        assert [d for d in dirs if d.exists()] == []
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    assert mounts_under(root) == []


def _effective_cpu_quota(pid: int) -> float | None:
    """The tightest CPU quota (in CPUs) on ``pid``'s cgroup path, read from the host's
    own cgroupfs: v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` or v2 ``cpu.max``, on
    the process's dir and every ancestor (the kernel applies each of them)."""
    best: float | None = None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers and "cpu" not in controllers.split(","):
            continue
        for mount in _hierarchies():
            if controllers and not (mount / "cpu.cfs_quota_us").exists():
                continue
            if not controllers and not (mount / "cgroup.controllers").exists():
                continue
            d = mount / path.lstrip("/")
            while d.is_relative_to(mount) and d.exists():
                if (d / "cpu.max").exists():
                    quota_s, period_s = (d / "cpu.max").read_text().split()
                    q = None if quota_s == "max" else int(quota_s) / int(period_s)
                elif (d / "cpu.cfs_quota_us").exists():
                    quota = int((d / "cpu.cfs_quota_us").read_text())
                    period = int((d / "cpu.cfs_period_us").read_text())
                    q = None if quota < 0 else quota / period
                else:
                    q = None
                if q is not None and (best is None or q < best):
                    best = q
                if d == mount:
                    break
                d = d.parent
    return best


@pytest.mark.rootless_skip(_CG)
def test_cpu_limit_is_applied_to_the_step(
    runtime: str, tmp_path: Path, base_image: str, require_root: None
) -> None:
    # --step-cpus becomes the step cgroup's CFS quota, as docker's --cpus does: read
    # from the host's cgroupfs while the step runs (the kernel's own figure).
    marker = f"cpu-limit-{uuid.uuid4().hex[:8]}"
    ctx = write_context(tmp_path, f"FROM {base_image}\nRUN sh -c 'sleep 4; true' {marker}\n")
    cmd = [sys.executable, "-m", "ociworker", "build", "--root", str(tmp_path / "root")]
    cmd += ["--runtime", runtime, "--step-cpus", "0.5", "--progress", "plain", str(ctx)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = _wait_for_step(marker, proc)
        quota = _effective_cpu_quota(pid)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert quota == 0.5
