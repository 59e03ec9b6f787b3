"""A RUN step's own cgroup: created before the runtime starts, read after it ends.

runc and crun remove the cgroup they made for a container as soon as its
process exits (``run`` destroys it before returning), so figures read from it
afterwards are gone. Each step therefore gets a cgroup of ours, ``/NAME`` on
every hierarchy, and the runtime is told to put the container one level below
(``linux.cgroupsPath`` = ``/NAME/ctr``), applying the step's limits there. The
kernel charges CPU time, memory high-water marks and I/O to every ancestor, so
our cgroup still holds the step's figures when the runtime has removed its own;
we read them and remove ours.

Works on the three layouts: cgroup v1 (one hierarchy per controller), hybrid
(v1 controllers plus a controller-less v2 at ``/sys/fs/cgroup/unified``, this
project's CI host) and pure v2 (``/sys/fs/cgroup`` is cgroup2). A figure the
host does not account is ``None``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ociworker.core.progress import Usage

#: the runtime's container cgroup inside ours (the runtime creates and removes it)
LEAF = "ctr"

#: v2 controllers a step's cgroup hands down to the runtime's (those the parent has)
_V2_CONTROLLERS = ("cpu", "memory", "pids", "io")
#: v1 hierarchies we create our cgroup in ourselves (for its figures); the runtime
#: creates the others (cpuset among them, whose parent needs cpus/mems copied in)
_V1_ACCOUNTED = ("cpuacct", "memory", "pids", "blkio")


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: ``path`` is its mount point; ``controllers``
    are a v1 mount's (``name=systemd`` included); v2's are read from the files."""

    path: Path
    version: Literal[1, 2]
    controllers: frozenset[str] = frozenset()


def parse_mountinfo(text: str) -> tuple[Hierarchy, ...]:
    """The cgroup hierarchies of a ``/proc/self/mountinfo`` text whose root is
    the hierarchy's root (a bind of a sub-cgroup is not a place to create ours)."""
    out: list[Hierarchy] = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        pre, _, post = line.partition(" - ")
        pre_f, post_f = pre.split(), post.split()
        if len(post_f) < 3 or pre_f[3] != "/":
            continue
        mount_point = Path(pre_f[4].replace("\\040", " "))
        fstype, options = post_f[0], post_f[2].split(",")
        if fstype == "cgroup2":
            out.append(Hierarchy(mount_point, 2))
        elif fstype == "cgroup":
            names = frozenset(o for o in options if o not in ("rw", "ro") and "=" not in o)
            named = frozenset(o for o in options if o.startswith("name="))
            out.append(Hierarchy(mount_point, 1, names | named))
    return tuple(out)


def host_hierarchies() -> tuple[Hierarchy, ...]:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return ()
    return parse_mountinfo(text)


#: where a pure v2 host mounts its hierarchy (and where runc and crun look for it)
V2_MOUNT = Path("/sys/fs/cgroup")


def delegated_hierarchies(
    base: str, hierarchies: tuple[Hierarchy, ...], mount: Path = V2_MOUNT
) -> tuple[Hierarchy, ...]:
    """The v2 hierarchy mounted at ``mount`` rooted at the delegated cgroup ``base`` (a
    rootless worker's, ``core.cgroupdelegation``, a path in that hierarchy): step
    cgroups go below it, and a rootless worker has nowhere else to make them."""
    return tuple(
        Hierarchy(h.path / base.lstrip("/"), 2)
        for h in hierarchies
        if h.version == 2 and h.path == mount
    )[-1:]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (``cpu.stat``, ``memory.events``, ``pids.events``)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def blkio_bytes(text: str) -> tuple[int, int]:
    """(read, written) bytes of a v1 ``blkio.*io_service_bytes*`` file (per device
    lines ``8:0 Read N``; the ``Total`` lines are not summed twice)."""
    read = written = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            if parts[1] == "Read":
                read += int(parts[2])
            elif parts[1] == "Write":
                written += int(parts[2])
    return read, written


def io_stat_bytes(text: str) -> tuple[int, int]:
    """(read, written) bytes of a v2 ``io.stat`` (``8:0 rbytes=N wbytes=N ...``)."""
    read = written = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if value.isdigit():
                if key == "rbytes":
                    read += int(value)
                elif key == "wbytes":
                    written += int(value)
    return read, written


@dataclass(frozen=True)
class Sample:
    """What a step's cgroup holds right now (polled while it runs)."""

    pids: int | None = None
    memory: int | None = None
    #: forks the pids limit refused so far
    pids_refused: int = 0


class StepCgroup:
    """The cgroup ``/NAME`` of one step on every hierarchy of ``hierarchies``."""

    def __init__(self, name: str, hierarchies: tuple[Hierarchy, ...], base: str = "") -> None:
        """``base``: the cgroup path ``hierarchies`` are rooted at (a delegated one),
        which the runtime's ``cgroupsPath`` (from the hierarchy's root) starts with."""
        self.name = name
        self._hierarchies = hierarchies
        self._base = base.rstrip("/")
        #: the highest memory.current seen, for kernels without memory.peak
        self._memory_seen = 0
        #: the v2 controllers ours hands down to the runtime's (None: not v2 only, or
        #: not created yet): a limit of another one cannot be set below ours
        self.handed_down: frozenset[str] | None = None

    @property
    def runtime_path(self) -> str:
        """``linux.cgroupsPath`` for the runtime: its cgroup inside ours."""
        return f"{self._base}/{self.name}/{LEAF}"

    def _dir(self, controller: str) -> Path | None:
        """Our cgroup's dir where ``controller`` is accounted: a v1 hierarchy that
        has it, else a v2 one (whose files exist only when the controller is
        enabled, or for ``cpu.stat``, always)."""
        for h in self._hierarchies:
            if h.version == 1 and controller in h.controllers:
                return h.path / self.name
        for h in self._hierarchies:
            if h.version == 2:
                return h.path / self.name
        return None

    def create(self) -> None:
        for h in self._hierarchies:
            if h.version == 1 and not h.controllers & set(_V1_ACCOUNTED):
                continue
            d = h.path / self.name
            d.mkdir(exist_ok=True)
            if h.version == 2:
                # The runtime's cgroup below ours can only use the controllers
                # ours hands down (on a hybrid host there are none to hand).
                have = (_read(d / "cgroup.controllers") or "").split()
                handed = [c for c in _V2_CONTROLLERS if c in have]
                if handed:
                    (d / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in handed))
                if all(x.version == 2 for x in self._hierarchies):
                    self.handed_down = frozenset(handed)

    def limit_pids(self, limit: int) -> bool:
        """Put the pids limit on our own cgroup (False: no pids controller there).

        Ours outlives the runtime's cgroup below it, so the count of forks the
        limit refused (``pids.events``, kept by the cgroup whose limit refused
        them) can still be read once the step has ended: a fork bomb whose shell
        gave up on its own between two samples is still named as such."""
        d = self._dir("pids")
        if d is None or not (d / "pids.max").exists():
            return False
        (d / "pids.max").write_text(str(limit))
        return True

    def sample(self) -> Sample:
        pids_dir, mem_dir = self._dir("pids"), self._dir("memory")
        pids = _int(pids_dir / "pids.current") if pids_dir else None
        memory = None
        if mem_dir is not None:
            memory = _int(mem_dir / "memory.usage_in_bytes")
            if memory is None:
                memory = _int(mem_dir / "memory.current")
        if memory is not None:
            self._memory_seen = max(self._memory_seen, memory)
        refused = 0
        if pids_dir is not None:
            # v1 counts a refused fork in the cgroup whose limit refused it (the
            # runtime's, below ours); v2 in ours too. The larger is the count.
            for d in (pids_dir, pids_dir / LEAF):
                text = _read(d / "pids.events")
                if text is not None:
                    refused = max(refused, flat_keyed(text).get("max", 0))
        return Sample(pids, memory, refused)

    def oom_kills(self) -> int | None:
        """OOM kills in our cgroup's subtree (v2 ``memory.events`` counts the
        descendants'; v1 counts only a cgroup's own, and the runtime's is gone)."""
        d = self._dir("memory")
        text = _read(d / "memory.events") if d else None
        if text is None:
            return None
        return flat_keyed(text).get("oom_kill")

    def usage(self) -> Usage:
        cpu: float | None = None
        d = self._dir("cpuacct")
        ns = _int(d / "cpuacct.usage") if d else None
        if ns is not None:
            cpu = ns / 1e9
        else:
            d = self._dir("cpu")
            stat = _read(d / "cpu.stat") if d else None
            if stat is not None and "usage_usec" in (kv := flat_keyed(stat)):
                cpu = kv["usage_usec"] / 1e6

        peak: int | None = None
        d = self._dir("memory")
        if d is not None:
            peak = _int(d / "memory.max_usage_in_bytes")
            if peak is None:
                peak = _int(d / "memory.peak")  # kernel >= 5.19
            if peak is None and (d / "memory.current").exists():
                peak = self._memory_seen  # sampled while it ran

        read = written = None
        d = self._dir("blkio")
        for f in ("blkio.throttle.io_service_bytes_recursive", "blkio.io_service_bytes_recursive"):
            text = _read(d / f) if d else None
            if text is not None:
                read, written = blkio_bytes(text)
                break
        else:
            d = self._dir("io")
            text = _read(d / "io.stat") if d else None
            if text is not None:
                read, written = io_stat_bytes(text)
        return Usage(cpu, peak, read, written)

    def remove(self) -> None:
        """Remove ours (and the runtime's, if it left it) on every hierarchy."""
        for h in self._hierarchies:
            remove_tree(h.path / self.name)


def remove_tree(d: Path, *, wait: float = 2.0) -> bool:
    """rmdir a cgroup and its children, deepest first; a cgroup whose last
    processes are still exiting is busy for a moment, so retry up to ``wait``
    seconds. False if something is left (a cgroup with live processes)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            for sub, dirs, _ in os.walk(d, topdown=False):
                for name in dirs:
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(os.path.join(sub, name))
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def remove_leftovers(
    prefix: str, hierarchies: tuple[Hierarchy, ...] | None = None, *, wait: float = 0.5
) -> int:
    """Remove the step cgroups named ``prefix...`` that a killed worker left
    (only empty ones can go: a live step of another worker keeps its own),
    waiting up to ``wait`` seconds for each to empty. How many were removed."""
    n = 0
    for h in host_hierarchies() if hierarchies is None else hierarchies:
        try:
            entries = list(os.scandir(h.path))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False):
                n += remove_tree(Path(e.path), wait=wait)
    return n
