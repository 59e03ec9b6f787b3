"""Yama's ptrace scope 1 ("attach only to your own descendants") for RUN steps.

Why: Docker's seccomp profile allows ``ptrace`` (kernels >= 4.8 check seccomp
after a tracer's changes) and leaves it to the host's Yama LSM, whose default
``ptrace_scope=1`` stops a process from attaching to anything but its
descendants. A kernel without Yama (this project's CI host has none) would let
a step's process attach to, and read or rewrite the memory of, any process of
the step running as the same user. A seccomp filter cannot tell a child from a
non-child, and refusing PTRACE_ATTACH/SEIZE outright breaks ``strace CMD`` and
``gdb`` in a RUN. So the step's profile (``seccomp.guard_ptrace``) sends those
two requests, and process_vm_readv/writev (the same access check in the
kernel), to this supervisor through seccomp user notification
(SCMP_ACT_NOTIFY): the runtime hands us the filter's notify fd over the unix
socket named by ``linux.seccomp.listenerPath`` (runc >= 1.1, newer crun) or
crun's ``run.oci.seccomp.receiver`` annotation (crun 1.8), and we answer each
call: the target is a descendant of the caller -> the kernel carries on with
the call (SECCOMP_USER_NOTIF_FLAG_CONTINUE, so every other rule of the kernel
still applies), otherwise EPERM, as Yama answers.

How a target is found: its pid is a number in the caller's pid namespace. The
caller's own view (``/proc/<caller>/root/proc``) is not trusted, as a step may
``chroot`` (CAP_SYS_CHROOT is in Docker's set) into a tree of fake status
files; our own /proc is read instead: the process whose pid namespace is the
caller's and whose innermost NSpid is the number, then its PPid chain up to the
caller (Yama's ``task_is_descendant``). Pid reuse of the caller is excluded by
SECCOMP_IOCTL_NOTIF_ID_VALID right before we answer.

Everything fails closed: an error while deciding answers EPERM; if this thread
dies, the notify fds and the socket close, so a caller waiting for an answer
gets ENOSYS from the kernel and a runtime starting a step cannot connect -
nothing hangs. One socket per executor; each notify fd is closed when its step
ends (the kernel reports POLLHUP once no process uses the filter).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ociworker.log import get_logger

_log = get_logger("ociworker.executor.ptrace_guard")

# <linux/seccomp.h>: _IOWR('!', 0, struct seccomp_notif) and friends, in the
# asm-generic ioctl encoding (x86, arm, arm64, riscv, s390x; not mips/ppc/sparc).
_NOTIF = struct.Struct("=QII iIQ6Q")  # id, pid, flags, data{nr, arch, ip, args[6]}
_RESP = struct.Struct("=QqiI")  # id, val, error, flags
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("!") << 8 | nr


NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, _NOTIF.size)
NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, _RESP.size)
NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)
USER_NOTIF_FLAG_CONTINUE = 1

# (AUDIT_ARCH_*, syscall nr) -> index of the target pid among the arguments
_AUDIT_X86_64, _AUDIT_I386, _X32 = 0xC000003E, 0x40000003, 0x40000000
_AUDIT_AARCH64, _AUDIT_ARM = 0xC00000B7, 0x40000028
_TARGET_ARG: dict[tuple[int, int], int] = {
    (_AUDIT_X86_64, 101): 1,  # ptrace
    (_AUDIT_X86_64, 310): 0,  # process_vm_readv
    (_AUDIT_X86_64, 311): 0,  # process_vm_writev
    (_AUDIT_X86_64, _X32 | 521): 1,
    (_AUDIT_X86_64, _X32 | 539): 0,
    (_AUDIT_X86_64, _X32 | 540): 0,
    (_AUDIT_I386, 26): 1,
    (_AUDIT_I386, 347): 0,
    (_AUDIT_I386, 348): 0,
    (_AUDIT_AARCH64, 117): 1,
    (_AUDIT_AARCH64, 270): 0,
    (_AUDIT_AARCH64, 271): 0,
    (_AUDIT_ARM, 26): 1,
    (_AUDIT_ARM, 376): 0,
    (_AUDIT_ARM, 377): 0,
}

#: a PPid chain longer than this is no process tree (pid_max is 2**22)
_MAX_DEPTH = 1 << 16
_CACHE_MAX = 4096


class Verdict(Enum):
    ALLOW = "allow"  # a descendant: the kernel decides the rest
    DENY = "deny"  # EPERM, as Yama
    NO_SUCH = "no-such"  # ESRCH, as the kernel for a pid absent from the namespace


@dataclass(frozen=True)
class Status:
    tgid: int
    ppid: int
    #: the pid in each pid namespace, outermost (the /proc reader's) first
    nspid: tuple[int, ...]


class ProcessGone(Exception):
    """A task we need is gone, or /proc will not show it to us."""


class ProcTree:
    """Processes as a ``/proc`` at ``root`` shows them (a fake tree in tests).

    Remembers where a (namespace, pid) was found, checked again on every use,
    so a step's repeated attaches do not scan every process of the host."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root
        self._where: dict[tuple[str, int], int] = {}

    def status(self, pid: int) -> Status:
        return self._status(self.root / str(pid) / "status")

    def _status(self, path: Path) -> Status:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:  # gone, or hidden from us (EACCES)
            raise ProcessGone(str(path)) from exc
        fields = dict(ln.partition(":")[::2] for ln in text.splitlines())
        try:
            return Status(
                tgid=int(fields["Tgid"]),
                ppid=int(fields["PPid"]),
                nspid=tuple(int(p) for p in fields["NSpid"].split()),
            )
        except (KeyError, ValueError) as exc:
            # No NSpid before Linux 4.1: we cannot place the target; refuse.
            raise ProcessGone(f"{path}: no Tgid/PPid/NSpid") from exc

    def pid_ns(self, pid: int) -> str:
        try:
            return os.readlink(self.root / str(pid) / "ns" / "pid")
        except OSError as exc:  # gone, or not ours to inspect (EACCES)
            raise ProcessGone(str(pid)) from exc

    def _matches(self, host: int, ns: str, nr: int) -> bool:
        try:
            return self.pid_ns(host) == ns and self.status(host).nspid[-1] == nr
        except ProcessGone:
            return False

    def find(self, ns: str, nr: int) -> int | None:
        """Our pid for the task that is ``nr`` in pid namespace ``ns``, if any."""
        known = self._where.get((ns, nr))
        if known is not None and self._matches(known, ns, nr):
            return known
        if len(self._where) > _CACHE_MAX:
            self._where.clear()
        same_ns = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                try:
                    if self.pid_ns(pid) != ns:
                        continue
                    inner = self.status(pid).nspid[-1]
                except ProcessGone:
                    continue
                same_ns.append(pid)
                self._where[(ns, inner)] = pid
                if inner == nr:
                    return pid
        # Not a process: maybe a thread (ptrace attaches to threads too).
        for pid in same_ns:
            tid = self._thread_of(pid, nr)
            if tid is not None:
                return tid
        return None

    def _thread_of(self, pid: int, nr: int) -> int | None:
        try:
            with os.scandir(self.root / str(pid) / "task") as tasks:
                for task in tasks:
                    if not task.name.isdigit() or int(task.name) == pid:
                        continue
                    try:
                        if self._status(Path(task.path) / "status").nspid[-1] == nr:
                            return int(task.name)
                    except ProcessGone:
                        continue
        except OSError:
            pass  # the process ended
        return None


def decide(tree: ProcTree, caller: int, target: int) -> Verdict:
    """May task ``caller`` (our pid) attach to ``target`` (a pid in the caller's
    namespace)? Yama's rule: only if the target's thread group descends from
    the caller's (its own counts; the kernel then refuses that itself)."""
    if target <= 0:
        return Verdict.NO_SUCH
    me = tree.status(caller)
    host = tree.find(tree.pid_ns(caller), target)
    if host is None:
        return Verdict.NO_SUCH
    walker = tree.status(host).tgid
    for _ in range(_MAX_DEPTH):
        if walker == me.tgid:
            return Verdict.ALLOW
        if walker <= 0:
            return Verdict.DENY
        walker = tree.status(walker).ppid
    return Verdict.DENY


def _int32(x: int) -> int:
    # The kernel takes a pid_t (int) from the register.
    return ctypes.c_int32(x & 0xFFFFFFFF).value


def is_notify_fd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
    except OSError:
        return False


def answer(fd: int, tree: ProcTree) -> None:
    """Receive one notification on ``fd`` and answer it."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(fd, NOTIF_RECV, buf, True)
    except OSError:
        return  # ENOENT: the caller died (or was interrupted) before we looked
    nid, pid, _, nr, arch, _, *args = _NOTIF.unpack(buf)
    error, flags = -errno.EPERM, 0
    try:
        index = _TARGET_ARG.get((arch, nr))
        if index is not None:
            verdict = decide(tree, pid, _int32(args[index]))
            if verdict is Verdict.ALLOW:
                error, flags = 0, USER_NOTIF_FLAG_CONTINUE
            elif verdict is Verdict.NO_SUCH:
                error = -errno.ESRCH
    except ProcessGone:
        pass  # the caller or the target's chain went away mid-walk: refuse
    except Exception as exc:  # fail closed, never kill the supervisor
        _log.warning("ptrace guard: cannot decide, refusing", error=repr(exc))
    # The caller is still the task that asked (its pid was not reused while
    # we read /proc under that number).
    try:
        fcntl.ioctl(fd, NOTIF_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
        fcntl.ioctl(fd, NOTIF_SEND, bytearray(_RESP.pack(nid, 0, error, flags)), True)
    except OSError:
        pass  # ENOENT: the caller is gone; nothing to answer


class PtraceGuard:
    """The supervisor: a unix socket at ``path`` and a thread answering every
    notify fd a runtime sends to it. A thread, not an asyncio task: it works the
    same in an embedded build and in ``ociworker serve``, and a busy event loop
    cannot delay a step's syscall."""

    def __init__(self, path: Path, tree: ProcTree | None = None) -> None:
        self.path = path
        self._tree = tree or ProcTree()
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                if self._thread.is_alive():
                    return
                # It died (and closed its fds and socket): a new one.
                self._thread.join()
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._thread = None
            remove_socket(self.path)  # a dead worker's
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(str(self.path))
                os.chmod(self.path, 0o600)  # only the runtime (root) may hand us fds
                sock.listen(64)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                remove_socket(self.path)
                raise
            self._sock = sock
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._thread = threading.Thread(
                target=self._serve, name="ociworker-ptrace-guard", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the thread, close every fd, remove the socket."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            thread.join()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _serve(self) -> None:
        assert self._sock is not None
        listener = self._sock
        conns: dict[int, socket.socket] = {}
        notify: set[int] = set()
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                for fd, ev in poller.poll():
                    if fd == self._wake_r:
                        return
                    try:
                        if fd == listener.fileno():
                            self._accept(listener, conns, poller)
                        elif fd in conns:
                            self._take(conns, fd, notify, poller)
                        elif fd in notify:
                            if ev & select.POLLIN:
                                answer(fd, self._tree)
                            elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                                # The step's processes are gone.
                                poller.unregister(fd)
                                notify.discard(fd)
                                os.close(fd)
                    except Exception as exc:
                        _log.warning("ptrace guard: event failed", error=repr(exc))
        except BaseException as exc:
            _log.error("ptrace guard stopped", error=repr(exc))
            raise
        finally:
            # Callers waiting on a closed notify fd get ENOSYS, a runtime that
            # cannot connect fails its step: nothing waits for us any more.
            for c in conns.values():
                c.close()
            for fd in notify:
                with contextlib.suppress(OSError):
                    os.close(fd)
            listener.close()
            remove_socket(self.path)

    @staticmethod
    def _accept(
        listener: socket.socket, conns: dict[int, socket.socket], poller: select.poll
    ) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            conns[conn.fileno()] = conn
            poller.register(conn.fileno(), select.POLLIN)

    @staticmethod
    def _take(
        conns: dict[int, socket.socket], fd: int, notify: set[int], poller: select.poll
    ) -> None:
        """Read the runtime's message (a JSON state, the notify fd attached);
        crun connects early and sends once the filter exists, so only when
        there is something to read, never blocking the other steps' answers."""
        conn = conns[fd]
        size = socket.CMSG_SPACE(8 * struct.calcsize("i"))
        try:
            # close-on-exec from the start: a runtime we spawn meanwhile must
            # not inherit a step's notify fd
            data, ancdata, _, _ = conn.recvmsg(1 << 16, size, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        got: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(payload) // struct.calcsize("i")
                got.extend(struct.unpack(f"{n}i", payload[: n * struct.calcsize("i")]))
        for nfd in got:
            if is_notify_fd(nfd):
                notify.add(nfd)
                poller.register(nfd, select.POLLIN)
            else:
                os.close(nfd)
        if got or not data:
            poller.unregister(fd)
            del conns[fd]
            conn.close()


def remove_socket(path: Path) -> None:
    """Remove the socket at ``path`` (only a socket: never a file someone put there)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


#: sun_path holds 108 bytes with the terminating NUL
_SUN_PATH_MAX = 107


def socket_path(state_dir: Path, owner: str) -> Path:
    """Where the executor of ``state_dir`` run by worker process ``owner``
    (``executor.owners``: several embedded builds may share a root) listens: in
    the state dir, or (one too deep for a unix socket's name) in the temp dir,
    named after it."""
    inside = state_dir / f"ptrace-{owner}.sock"
    if len(os.fsencode(inside)) <= _SUN_PATH_MAX:
        return inside
    import hashlib
    import tempfile

    tag = hashlib.sha256(os.fsencode(state_dir)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ociworker-ptrace-{tag}-{owner}.sock"
