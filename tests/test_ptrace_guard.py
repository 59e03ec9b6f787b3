"""The ptrace supervisor's decision (Yama's scope 1) on fake /proc trees, and its
socket's life. The expectations are Yama's rule ("the target's thread group
descends from the caller's"), read off each tree as drawn, not from the code.

The tree used below (host pid: pid in the step's namespace C)::

    1 init (host)
    └─ 100 runc
       └─ 101:1 sh  ─┬─ 102:2 probe (thread 109:9) ─ 103:3 child (thread 107:7) ─ 104:4
                     ├─ 105:5 sibling (thread 108:8)
                     └─ 106:6 sibling
    200 runc of another step (namespace D)
    └─ 206:6 (its parent pid claims 102, to catch a lookup in the wrong namespace)
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from ociworker.executor.ptrace_guard import (
    ProcessGone,
    ProcTree,
    PtraceGuard,
    Status,
    Verdict,
    decide,
    remove_socket,
    socket_path,
)

HOST, C, D = "pid:[4026531836]", "pid:[4026532001]", "pid:[4026532002]"


def _task(
    root: Path, pid: int, tgid: int, ppid: int, nspid: tuple[int, ...], ns: str | None
) -> None:
    d = root / str(pid)
    (d / "ns").mkdir(parents=True)
    nspid_s = "\t".join(map(str, nspid))
    (d / "status").write_text(
        f"Name:\tx\nTgid:\t{tgid}\nPid:\t{pid}\nPPid:\t{ppid}\nNSpid:\t{nspid_s}\n"
    )
    if ns is None:
        (d / "ns" / "pid").write_text("")  # unreadable as a link, as EACCES is
    else:
        os.symlink(ns, d / "ns" / "pid")
    if tgid != pid:
        # A thread: under its process's task/ too (where a scan finds it).
        t = root / str(tgid) / "task" / str(pid)
        t.mkdir(parents=True)
        (t / "status").write_text((d / "status").read_text())


@pytest.fixture
def tree(tmp_path: Path) -> ProcTree:
    r = tmp_path / "proc"
    _task(r, 1, 1, 0, (1,), None)
    _task(r, 100, 100, 1, (100,), HOST)
    _task(r, 101, 101, 100, (101, 1), C)
    _task(r, 102, 102, 101, (102, 2), C)
    _task(r, 103, 103, 102, (103, 3), C)
    _task(r, 104, 104, 103, (104, 4), C)
    _task(r, 105, 105, 101, (105, 5), C)
    _task(r, 106, 106, 101, (106, 6), C)
    _task(r, 107, 103, 102, (107, 7), C)
    _task(r, 108, 105, 101, (108, 8), C)
    _task(r, 109, 102, 101, (109, 9), C)
    _task(r, 200, 200, 1, (200,), HOST)
    _task(r, 206, 206, 102, (206, 6), D)
    for pid in (107, 108, 109):
        # Threads are not listed in /proc itself; only reachable by number.
        (r / str(pid)).rename(r / f".{pid}")
    return _ThreadAwareTree(r)


class _ThreadAwareTree(ProcTree):
    """/proc/<tid> of a thread exists but is not listed; the fake keeps it aside."""

    def status(self, pid: int) -> Status:
        hidden = self.root / f".{pid}"
        if hidden.is_dir():
            return self._status(hidden / "status")
        return super().status(pid)

    def pid_ns(self, pid: int) -> str:
        hidden = self.root / f".{pid}"
        if hidden.is_dir():
            return os.readlink(hidden / "ns" / "pid")
        return super().pid_ns(pid)


@pytest.mark.parametrize(
    ("target", "verdict"),
    [
        (1, Verdict.DENY),  # the probe's parent, the step's shell
        (5, Verdict.DENY),  # a sibling
        (6, Verdict.DENY),  # a sibling, though namespace D's 6 claims the probe as parent
        (8, Verdict.DENY),  # a thread of a sibling
        (3, Verdict.ALLOW),  # its child
        (4, Verdict.ALLOW),  # its grandchild
        (7, Verdict.ALLOW),  # a thread of its child
        (2, Verdict.ALLOW),  # itself: Yama lets it through, the kernel refuses
        (9, Verdict.ALLOW),  # its own thread: the same
        (42, Verdict.NO_SUCH),  # no such pid in the step
        (0, Verdict.NO_SUCH),
        (-1, Verdict.NO_SUCH),
    ],
)
def test_only_descendants(tree: ProcTree, target: int, verdict: Verdict) -> None:
    assert decide(tree, 102, target) is verdict


def test_a_caller_thread_is_its_process(tree: ProcTree) -> None:
    assert decide(tree, 109, 3) is Verdict.ALLOW
    assert decide(tree, 109, 1) is Verdict.DENY


def test_a_gone_caller_is_an_error(tree: ProcTree) -> None:
    with pytest.raises(ProcessGone):
        decide(tree, 999, 3)


def test_a_reused_pid_is_looked_up_again(tree: ProcTree) -> None:
    assert decide(tree, 102, 4) is Verdict.ALLOW
    # 104 (step pid 4) ends; step pid 4 comes back as a sibling, host pid 114.
    root = tree.root
    for p in (root / "104").rglob("*"):
        if p.is_file() or p.is_symlink():
            p.unlink()
    for p in sorted((root / "104").rglob("*"), reverse=True):
        p.rmdir()
    (root / "104").rmdir()
    _task(root, 114, 114, 101, (114, 4), C)
    assert decide(tree, 102, 4) is Verdict.DENY


def test_socket_path_fits_a_sockaddr(tmp_path: Path) -> None:
    short = socket_path(tmp_path, "0a1b2c3d")
    assert short.parent == tmp_path
    # two worker processes on one root never share a socket
    assert short != socket_path(tmp_path, "4e5f6a7b")
    deep = tmp_path / ("d" * 120)
    far = socket_path(deep, "0a1b2c3d")
    assert len(os.fsencode(far)) <= 107
    assert far != socket_path(tmp_path / ("e" * 120), "0a1b2c3d")
    assert far != socket_path(deep, "4e5f6a7b")


def test_guard_socket_lives_with_the_guard(tmp_path: Path) -> None:
    path = tmp_path / "g.sock"
    # A dead worker's socket is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    guard = PtraceGuard(path)
    guard.start()
    try:
        assert guard.running
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        # A client that says nothing, one that sends a fd that is no notify fd:
        # neither stops the guard from serving the next.
        for _ in range(2):
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(path))
        r, w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(path))
                socket.send_fds(c, [b"{}"], [r])
                # The guard closes what it was sent and hangs up.
                c.settimeout(5)
                assert c.recv(1) == b""
        finally:
            os.close(r)
            os.close(w)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
    finally:
        guard.close()
    assert not guard.running
    assert not path.exists()
    guard.close()  # twice is fine


def test_remove_socket_only_removes_sockets(tmp_path: Path) -> None:
    f = tmp_path / "not-a-socket"
    f.write_text("keep")
    remove_socket(f)
    remove_socket(tmp_path / "absent")
    assert f.read_text() == "keep"
