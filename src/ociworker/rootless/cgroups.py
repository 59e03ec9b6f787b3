"""The rootless worker's cgroup set-up (the IO around ``core.cgroupdelegation``).

The user's process, before it makes the namespaces, reads its cgroup, moves itself
into the leaf the plan names and enables the controllers; the namespaces' processes
(and pasta) are its children and start in that leaf. The worker inside learns where
to make its step cgroups (or why it cannot) from the environment, as it learns that
it is rootless.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ociworker.core.cgroupdelegation import (
    CgroupFacts,
    Delegated,
    NotDelegated,
    Plan,
    parse_proc_cgroup,
    plan,
    warning,
)
from ociworker.fs.userns import CGROUP_BASE, CGROUP_WARNING

MOUNT = Path("/sys/fs/cgroup")


def fs_type(mount_point: Path, mountinfo: str) -> str:
    """The type of the filesystem mounted on ``mount_point`` ("" if none): the last
    mount there is the one seen."""
    found = ""
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if sep and len(fields) >= 5 and fields[4] == str(mount_point) and post.split():
            found = post.split()[0]
    return found


def _delegated_to(d: Path, uid: int) -> bool:
    """systemd delegates a cgroup by chowning it and the files that move processes and
    enable controllers; their owner's write bits must be set too. (The user's view,
    whoever asks: for root, os.access would say yes to anything.)"""
    try:
        for p in (d, d / "cgroup.procs", d / "cgroup.subtree_control"):
            st = p.stat()
            if st.st_uid != uid or not st.st_mode & stat.S_IWUSR:
                return False
    except OSError:
        return False
    return True


def gather(uid: int, pid: int, proc_cgroup: str, fs: str, mount: Path = MOUNT) -> CgroupFacts:
    """The facts of the cgroup the ``/proc/self/cgroup`` text ``proc_cgroup`` names, in
    the v2 hierarchy mounted at ``mount`` (whose type is ``fs``)."""
    own = parse_proc_cgroup(proc_cgroup) if fs == "cgroup2" else None
    if own is None:
        return CgroupFacts(fs, None)
    d = mount / own.lstrip("/")
    try:
        controllers = tuple((d / "cgroup.controllers").read_text().split())
        procs = tuple(int(p) for p in (d / "cgroup.procs").read_text().split())
    except (OSError, ValueError):
        controllers, procs = (), ()
    return CgroupFacts(fs, own, _delegated_to(d, uid), controllers, procs, pid)


def apply(p: Plan, pid: int, mount: Path = MOUNT) -> Plan:
    """Carry out ``p``: move ``pid`` into the leaf, then enable the controllers (in this
    order: the kernel refuses them while the cgroup holds a process). A step that fails
    (another process joined meanwhile, say) makes it a NotDelegated saying why."""
    if not isinstance(p, Delegated):
        return p
    base, leaf = mount / p.base.lstrip("/"), mount / p.leaf.lstrip("/")
    try:
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(pid))
        if p.controllers:
            (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in p.controllers))
    except OSError as exc:
        return NotDelegated(f"cannot set up the delegated cgroup {p.base}: {exc.strerror or exc}")
    return p


def prepare(uid: int, user: str) -> dict[str, str]:
    """Set up this process's cgroup for a rootless worker; the environment that tells
    the worker the outcome."""
    try:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        proc_cgroup = mountinfo = ""
    pid = os.getpid()
    done = apply(plan(gather(uid, pid, proc_cgroup, fs_type(MOUNT, mountinfo)), user), pid)
    env: dict[str, str] = {}
    if isinstance(done, Delegated):
        env[CGROUP_BASE] = done.base
    text = warning(done)
    if text:
        env[CGROUP_WARNING] = text
    return env
