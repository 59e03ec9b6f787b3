"""What a killed worker leaves, and who removes it (issue 11, issue 18 item 1), on
runc and crun.

An embedded build (``ociworker build --root R`` without ``--addr``) killed with
SIGKILL while a step runs leaves that step behind: its container goes on
running, its rootfs stays mounted, its cgroup, network namespace, veth, bridge
and nft tables stay. The next embedded build on the same root removes exactly
that, and leaves a concurrent live build's step alone. A SIGTERM leaves nothing.
A daemon killed and restarted on the same root leaves nothing either.

Everything is seen from the host only: the step's processes and their
``/proc/PID/{cgroup,ns/net}``, ``<runtime> --root ... list``, mountinfo, ``ip``
(the host end of the step's ``eth0`` and its bridge) and ``nft list tables``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ociworker.executor.runtime import recover_state_dir
from ociworker.testing.daemon import spawn_daemon
from test_build import write_context

MountsUnder = Callable[[Path], list[Path]]


def _build_cmd(root: Path, runtime: str, ctx: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ociworker",
        "build",
        "--root",
        str(root),
        "--runtime",
        runtime,
        "--progress",
        "plain",
        *extra,
        str(ctx),
    ]


def _start(root: Path, runtime: str, ctx: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _build_cmd(root, runtime, ctx, *extra),
        env={**os.environ, "RECOVERY_TOKEN": "not-a-real-secret"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


#: how the parked step runs: its RUN flags and the build's flags for them.
#: ``secret``: a secret in the env puts the step's config and its runtime's
#: state on a tmpfs of the step's own; a secret file is on a tmpfs of the
#: worker's scratch dir; ``none``: a namespace pinned by a mount, no veth.
CASES = {
    "default": ("", ()),
    "none": ("--network=none ", ()),
    "secret": (
        "--mount=type=secret,id=tok,env=TOK --mount=type=secret,id=file ",
        ("--secret", "id=tok,env=RECOVERY_TOKEN", "--secret", "id=file,env=RECOVERY_TOKEN"),
    ),
}


def _parked_step(tmp: Path, base_image: str, marker: str, name: str, case: str = "default") -> Path:
    """A build whose RUN prints ``started <marker>`` and then waits in ``sleep``
    until the test ends that sleep (``_release``), then succeeds: no timing."""
    flags = CASES[case][0]
    return write_context(
        tmp,
        f"FROM {base_image}\n"
        f"RUN {flags}echo started {marker}; sleep 3600 || true; echo {marker} done\n",
        name=name,
    )


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


def _wait_running(proc: subprocess.Popen[str], marker: str) -> int:
    """Wait for the step's log line, then for its process; the step's shell pid."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"started {marker}" in line and "RUN" not in line:
            break
    else:
        raise AssertionError(f"the build ended (rc {proc.wait()}) before its step started")
    deadline = time.monotonic() + 60
    while not (pids := _procs_with(f"echo {marker} done")) or not _sleeps(pids[0]):
        assert time.monotonic() < deadline, "the step's process never showed"
        time.sleep(0.05)
    return pids[0]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _sleeps(shell: int) -> list[int]:
    """The parked step's ``sleep`` (forked once its shell has printed)."""
    try:
        children = _children(shell)
        return [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "sleep"]
    except OSError:
        return []


def _release(shell: int) -> None:
    """End the parked step's ``sleep``: its shell goes on and exits 0."""
    sleeps = _sleeps(shell)
    assert sleeps, "the parked step has no sleep"
    for pid in sleeps:
        os.kill(pid, signal.SIGTERM)


def _containers(root: Path, runtime: str) -> set[str]:
    """Containers the runtime lists under the root: in the worker's state dir,
    and in the private state dirs of steps with secrets (in their bundles)."""
    executor = root / "executor"
    found = set()
    for state in [executor / "runtime", *executor.glob("bundles/*/runtime")]:
        if not (state / runtime).is_dir():
            continue
        out = subprocess.run(
            [runtime, "--root", str(state / runtime), "list", "-q"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        found |= set(out.stdout.split())
    return found


def _hierarchies() -> list[Path]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[0] in ("cgroup", "cgroup2"):
            out.append(Path(pre.split()[4]))
    return out


def _cgroup_dirs(pid: int) -> set[Path]:
    """The top-level cgroup of ``pid`` on every hierarchy, where it is not the
    host's root (``4:memory:/ociw-.../ctr`` -> <memory mount>/ociw-...)."""
    tops = set()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        first = line.split(":", 2)[2].strip("/").split("/")[0]
        if first:
            tops.add(first)
    return {h / t for h in _hierarchies() for t in tops if (h / t).is_dir()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _netns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _in_netns(inode: int, pids: frozenset[int] | None = None) -> frozenset[int]:
    """Processes (of ``pids``, or all) in the network namespace ``inode``. Checked
    by the processes that were in it, not by the inode alone: the kernel hands a
    freed namespace's inode number to the next new one."""
    candidates = pids if pids is not None else {int(p) for p in os.listdir("/proc") if p.isdigit()}
    return frozenset(p for p in candidates if _netns(p) == inode)


def _runtime_parent(pid: int, runtime: str) -> set[int]:
    """The ``runc run``/``crun run`` process supervising a container's init."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    cmd = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
    return {ppid} if runtime in Path(cmd[0].decode()).name else set()


def _host_links() -> dict[int, dict[str, object]]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {int(link["ifindex"]): link for link in json.loads(out.stdout)}


def _step_links(pid: int) -> set[str]:
    """The host end of the step's eth0 and the bridge it is a port of."""
    inside = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "link", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    )
    peer = int(json.loads(inside.stdout)[0]["link_index"])
    host = _host_links()[peer]
    return {str(host["ifname"]), str(host["master"])}


def _tables() -> set[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def _tables_naming(links: set[str]) -> set[str]:
    """nft tables whose rules name one of ``links`` (or the veths' common stem)."""
    found = set()
    for table in _tables():
        family, name = table.split()[1:3]
        text = subprocess.run(
            ["nft", "list", "table", family, name], capture_output=True, text=True
        ).stdout
        if any(link in text or link[:10] + "*" in text for link in links):
            found.add(table)
    return found


@dataclass(frozen=True)
class Footprint:
    """What one running step holds on the host."""

    pids: frozenset[int]
    containers: frozenset[str]
    mounts: frozenset[Path]
    cgroups: frozenset[Path]
    netns: int
    #: the processes in that namespace while the step ran
    netns_pids: frozenset[int]
    links: frozenset[str]
    tables: frozenset[str]

    def left(self, root: Path, runtime: str, mounts_under: MountsUnder) -> dict[str, object]:
        """What of it is still there."""
        # A killed container's runtime process exits on its own once the
        # container is gone, a moment later; a zombie is gone already.
        deadline = time.monotonic() + 10
        while (alive := {p for p in self.pids if _alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.05)
        left: dict[str, object] = {
            "processes": alive,
            "containers": self.containers & _containers(root, runtime),
            "mounts": self.mounts & set(mounts_under(root)),
            "cgroups": {c for c in self.cgroups if c.exists()},
            "netns": bool(_in_netns(self.netns, self.netns_pids)),
            "links": self.links & {str(v["ifname"]) for v in _host_links().values()},
            "tables": self.tables & _tables(),
        }
        return {k: v for k, v in left.items() if v}


def _footprint(
    shell: int,
    root: Path,
    runtime: str,
    mounts_under: MountsUnder,
    *,
    containers_before: set[str],
    mounts_before: set[Path],
    case: str = "default",
) -> Footprint:
    """The step of ``shell`` as the host sees it; containers and mounts under
    the root are those that appeared since the ``*_before`` sets were taken."""
    links = _step_links(shell) if case != "none" else set()
    # crun writes a container's status after starting its process: a step may
    # print before ``crun list`` shows it
    deadline = time.monotonic() + 30
    while not _containers(root, runtime) - containers_before and time.monotonic() < deadline:
        time.sleep(0.05)
    fp = Footprint(
        pids=frozenset([shell, *_children(shell), *_runtime_parent(shell, runtime)]),
        containers=frozenset(_containers(root, runtime) - containers_before),
        mounts=frozenset(set(mounts_under(root)) - mounts_before),
        cgroups=frozenset(_cgroup_dirs(shell)),
        netns=os.stat(f"/proc/{shell}/ns/net").st_ino,
        netns_pids=_in_netns(os.stat(f"/proc/{shell}/ns/net").st_ino),
        links=frozenset(links),
        tables=frozenset(_tables_naming(links)),
    )
    # Each kind is really there while the step runs, or "nothing left" proves nothing.
    assert len(fp.containers) == 1, fp
    assert fp.mounts, fp
    assert fp.cgroups, fp
    assert fp.netns != os.stat("/proc/self/ns/net").st_ino
    assert len(fp.pids) == 3, fp  # the runtime's process, the step's shell, its sleep
    if case != "none":
        assert len(fp.links) == 2 and len(fp.tables) >= 1, fp
    if case == "secret":  # the step's own tmpfs, and the secret file's
        assert len([m for m in fp.mounts if "bundles" not in m.parts]) >= 1, fp
        assert len([m for m in fp.mounts if m.name.startswith("ociw-")]) == 1, fp
    return fp


def _succeeds(root: Path, runtime: str, ctx: Path) -> None:
    proc = subprocess.run(
        _build_cmd(root, runtime, ctx), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_mid_step(
    root: Path,
    runtime: str,
    tmp: Path,
    base_image: str,
    mounts_under: MountsUnder,
    case: str = "default",
) -> Footprint:
    """An embedded build SIGKILLed while its step runs; what it left."""
    marker = f"dead-{uuid.uuid4().hex}"
    containers, mounts = _containers(root, runtime), set(mounts_under(root))
    ctx = _parked_step(tmp, base_image, marker, "dead", case)
    proc = _start(root, runtime, ctx, *CASES[case][1])
    try:
        shell = _wait_running(proc, marker)
        fp = _footprint(
            shell,
            root,
            runtime,
            mounts_under,
            containers_before=containers,
            mounts_before=mounts,
            case=case,
        )
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    # The bug being fixed: all of it outlives the process, the step still runs.
    kinds = {"processes", "containers", "mounts", "cgroups", "netns"}
    if case != "none":
        kinds |= {"links", "tables"}
    assert set(fp.left(root, runtime, mounts_under)) == kinds
    return fp


@pytest.mark.parametrize("case", list(CASES))
def test_embedded_build_killed_mid_step_is_recovered_by_the_next(
    runtime: str,
    case: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: MountsUnder,
) -> None:
    root = tmp_path / "root"
    dead = _kill_mid_step(root, runtime, tmp_path, base_image, mounts_under, case)
    _succeeds(root, runtime, write_context(tmp_path, f"FROM {base_image}\nRUN echo next\n"))
    left = dead.left(root, runtime, mounts_under)
    assert left == {}, left
    # and nothing at all of either build under the root
    assert mounts_under(root) == []
    assert _containers(root, runtime) == set()
    # the dead process's scratch dir went with it; the next one's with that one
    assert list((root / "tmp").iterdir()) == []
    # and its step's snapshot (active while it ran): only committed ones stay
    assert _uncommitted(root) == []


def _uncommitted(root: Path) -> list[tuple[str, str]]:
    """Active and view snapshots, read from the snapshotter's database."""
    with sqlite3.connect(root / "snapshots" / "metadata.db") as db:
        rows = db.execute("SELECT key, kind FROM snapshots WHERE kind != 'committed'")
        return [(str(k), str(v)) for k, v in rows]


def test_recovery_leaves_a_live_concurrent_build_alone(
    runtime: str, tmp_path: Path, base_image: str, require_root: None, mounts_under: MountsUnder
) -> None:
    root = tmp_path / "root"
    live_marker = f"live-{uuid.uuid4().hex}"
    live_proc = _start(root, runtime, _parked_step(tmp_path, base_image, live_marker, "live"))
    try:
        live_shell = _wait_running(live_proc, live_marker)
        live = _footprint(
            live_shell, root, runtime, mounts_under, containers_before=set(), mounts_before=set()
        )
        live_snapshots = _uncommitted(root)
        assert [kind for _, kind in live_snapshots] == ["active"]
        dead = _kill_mid_step(root, runtime, tmp_path, base_image, mounts_under)
        assert not dead.containers & live.containers and not dead.mounts & live.mounts
        assert len(_uncommitted(root)) == 2

        _succeeds(root, runtime, write_context(tmp_path, f"FROM {base_image}\nRUN echo next\n"))
        left = dead.left(root, runtime, mounts_under)
        assert left == {}, left
        # the dead step's snapshot went, the live one's stays
        assert _uncommitted(root) == live_snapshots
        # the live build's step: every part of it still there, and it still runs
        assert live.left(root, runtime, mounts_under) == {
            "processes": set(live.pids),
            "containers": set(live.containers),
            "mounts": set(live.mounts),
            "cgroups": set(live.cgroups),
            "netns": True,
            "links": set(live.links),
            "tables": set(live.tables),
        }
        _release(live_shell)
        _, err = live_proc.communicate(timeout=300)
        assert live_proc.returncode == 0, err[-3000:]
        assert f"{live_marker} done" in err
    finally:
        if live_proc.poll() is None:
            live_proc.kill()
            live_proc.wait()
    assert live.left(root, runtime, mounts_under) == {}
    assert mounts_under(root) == []


@pytest.mark.parametrize("case", list(CASES))
def test_sigterm_of_an_embedded_build_leaves_nothing(
    runtime: str,
    case: str,
    tmp_path: Path,
    base_image: str,
    require_root: None,
    mounts_under: MountsUnder,
) -> None:
    root = tmp_path / "root"
    marker = f"term-{uuid.uuid4().hex}"
    ctx = _parked_step(tmp_path, base_image, marker, "term", case)
    proc = _start(root, runtime, ctx, *CASES[case][1])
    try:
        shell = _wait_running(proc, marker)
        fp = _footprint(
            shell,
            root,
            runtime,
            mounts_under,
            containers_before=set(),
            mounts_before=set(),
            case=case,
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert fp.left(root, runtime, mounts_under) == {}
    assert mounts_under(root) == []
    # nothing of the process under the root either: no scratch dir, no claim
    assert list((root / "tmp").iterdir()) == []
    assert list((root / "executor" / "owners").iterdir()) == []


def test_daemon_killed_mid_step_is_recovered_by_its_restart(
    runtime: str, tmp_path: Path, base_image: str, require_root: None, mounts_under: MountsUnder
) -> None:
    root, sock = tmp_path / "droot", tmp_path / "d.sock"
    args = ("--addr", f"unix://{sock}", "--root", str(root), "--runtime", runtime)
    daemon = spawn_daemon(args, tmp_path / "d1.log")
    marker = f"daemon-{uuid.uuid4().hex}"
    ctx = _parked_step(tmp_path, base_image, marker, "d")
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            "--addr",
            f"unix://{sock}",
            "--progress",
            "plain",
            str(ctx),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        shell = _wait_running(client, marker)
        fp = _footprint(
            shell, root, runtime, mounts_under, containers_before=set(), mounts_before=set()
        )
        daemon.kill()
        daemon.wait()
        client.communicate(timeout=60)
        assert "processes" in fp.left(root, runtime, mounts_under)
        daemon = spawn_daemon(args, tmp_path / "d2.log")
        assert fp.left(root, runtime, mounts_under) == {}
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    assert mounts_under(root) == []


@pytest.fixture(autouse=True)
def _no_stray_step(tmp_path: Path) -> Iterator[None]:
    """A failed test must leave neither a parked step sleeping for an hour nor
    the host resources of a build it killed (a passing one leaves none)."""
    yield
    _kill_parked()
    for executor in tmp_path.glob("*/executor"):
        asyncio.run(recover_state_dir(executor))


def _kill_parked() -> None:
    for pid in _procs_with("sleep 3600 || true"):
        try:
            for child in _children(pid):
                os.kill(child, signal.SIGKILL)
        except OSError:
            continue  # ended meanwhile


def test_daemon_start_leaves_a_live_embedded_build_alone(
    runtime: str, tmp_path: Path, base_image: str, require_root: None, mounts_under: MountsUnder
) -> None:
    """A daemon's start-up recovery sweeps the whole root only when no other
    worker process is alive on it: an embedded build's step stays whole."""
    root, sock = tmp_path / "root", tmp_path / "d.sock"
    marker = f"live-{uuid.uuid4().hex}"
    live_proc = _start(root, runtime, _parked_step(tmp_path, base_image, marker, "live"))
    daemon = None
    try:
        shell = _wait_running(live_proc, marker)
        live = _footprint(
            shell, root, runtime, mounts_under, containers_before=set(), mounts_before=set()
        )
        args = ("--addr", f"unix://{sock}", "--root", str(root), "--runtime", runtime)
        daemon = spawn_daemon(args, tmp_path / "d.log")
        ok = write_context(tmp_path, f"FROM {base_image}\nRUN echo via-daemon\n", name="ok")
        via = subprocess.run(
            [sys.executable, "-m", "ociworker", "build", "--addr", f"unix://{sock}", str(ok)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert via.returncode == 0, via.stderr[-3000:]
        assert live.left(root, runtime, mounts_under) == {
            "processes": set(live.pids),
            "containers": set(live.containers),
            "mounts": set(live.mounts),
            "cgroups": set(live.cgroups),
            "netns": True,
            "links": set(live.links),
            "tables": set(live.tables),
        }
        _release(shell)
        _, err = live_proc.communicate(timeout=300)
        assert live_proc.returncode == 0, err[-3000:]
    finally:
        if live_proc.poll() is None:
            live_proc.kill()
            live_proc.wait()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
    assert live.left(root, runtime, mounts_under) == {}
    assert mounts_under(root) == []
