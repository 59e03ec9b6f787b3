"""Mounting ``Mount`` values on the host (IO, needs CAP_SYS_ADMIN).

``mount_all`` calls mount(2) through ctypes rather than mount(8): it needs no
binary, reports errno directly, and lets us control the one thing mount(8)
cannot: the working directory the kernel resolves relative overlay paths
against.

Why that matters: the legacy mount(2) data string is copied into a single page
(4096 bytes), so an overlay with a few hundred absolute ``lowerdir`` paths does
not fit. Like containerd, when the data is too long we rewrite every overlay
path relative to their common parent directory and call mount(2) with that
directory as cwd. Python has one cwd per process, so the call runs in a
short-lived thread that first does ``unshare(CLONE_FS)``: that gives the thread
its own cwd (as a forked child would) without disturbing the other threads. If
even the relative form does not fit, ``mount_all`` raises ``HostError``; the
overlay snapshotter avoids that by flattening deep chains (see overlay.py),
using ``overlay_data_fits`` to decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from ociworker.core.mounts import Mount
from ociworker.errors import HostError, UnsupportedError
from ociworker.fs.paths import secure_join

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: overlayfs refuses more lower layers than this (OVL_MAX_STACK in the kernel)
MAX_OVERLAY_LOWERS = 500

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_RELATIME = 0x200000
_MNT_DETACH = 0x2
_CLONE_FS = 0x200

# Options that are mount(2) flags rather than filesystem data.
_FLAGS: dict[str, tuple[int, bool]] = {
    "ro": (_MS_RDONLY, True),
    "rw": (_MS_RDONLY, False),
    "nosuid": (_MS_NOSUID, True),
    "suid": (_MS_NOSUID, False),
    "nodev": (_MS_NODEV, True),
    "dev": (_MS_NODEV, False),
    "noexec": (_MS_NOEXEC, True),
    "exec": (_MS_NOEXEC, False),
    "noatime": (_MS_NOATIME, True),
    "nodiratime": (_MS_NODIRATIME, True),
    "relatime": (_MS_RELATIME, True),
    "bind": (_MS_BIND, True),
    "rbind": (_MS_BIND | _MS_REC, True),
}

# Overlay options whose values are paths (lowerdir is a ':'-separated list).
_OVERLAY_PATH_OPTIONS = ("lowerdir", "upperdir", "workdir")

# The C library the interpreter is linked with, by its already loaded symbols:
# find_library("c") runs ldconfig in a subprocess, milliseconds on every start.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# statvfs flag -> the mount option that keeps it (ST_RELATIME is not MS_RELATIME's bit).
_LOCKABLE = (
    (os.ST_NOSUID, "nosuid"),
    (os.ST_NODEV, "nodev"),
    (os.ST_NOEXEC, "noexec"),
    (os.ST_NOATIME, "noatime"),
    (os.ST_NODIRATIME, "nodiratime"),
    (os.ST_RELATIME, "relatime"),
)


def locked_options(path: str) -> list[str]:
    """The nosuid/nodev/noexec/atime options of the mount ``path`` is on.

    In a user namespace these flags of a mount made by a more privileged namespace are
    locked: a read-only remount of a bind of it that leaves one out fails with EPERM (a
    rootless worker inside a RUN --security=insecure step whose tmpfs has nosuid,nodev).
    Repeating them changes nothing, as a bind already carries its source mount's flags.
    """
    try:
        flag = os.statvfs(path).f_flag
    except OSError:
        return []
    return [name for bit, name in _LOCKABLE if flag & bit]


def _sys_mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} {source} on {target}",
    )


def bind_fd(fd: int, target: Path, *, recursive: bool = True) -> None:
    """Bind the directory open as ``fd`` (an ``O_PATH`` descriptor will do) on
    ``target``.

    The source is the fd's ``/proc/self/fd`` magic link, which the kernel
    follows to the very inode the fd holds: whatever was renamed or swapped
    for a symlink since it was opened, the mount is of what was resolved."""
    flags = _MS_BIND | (_MS_REC if recursive else 0)
    _sys_mount(f"/proc/self/fd/{fd}", str(target), None, flags, None)


def _split_options(m: Mount) -> tuple[int, bool, list[str]]:
    """(flags, readonly, data options) of ``m``."""
    flags = 0
    readonly = False
    data: list[str] = []
    for opt in m.options:
        if opt in _FLAGS:
            bit, on = _FLAGS[opt]
            if bit == _MS_RDONLY:
                readonly = on
            elif on:
                flags |= bit
            else:
                flags &= ~bit
        else:
            data.append(opt)
    if m.type in ("bind", "rbind"):
        flags |= _MS_BIND
        if m.type == "rbind":
            flags |= _MS_REC
    return flags, readonly, data


def _relative_overlay_data(data: list[str]) -> tuple[str, str]:
    """(common parent dir, data string with overlay paths relative to it)."""
    paths: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key in _OVERLAY_PATH_OPTIONS:
            paths.extend(value.split(":") if key == "lowerdir" else [value])
    if not paths or not all(os.path.isabs(p) for p in paths):
        return "", ",".join(data)
    common = os.path.commonpath(paths)
    if common in paths:
        # A path equal to the common dir would become "."; use its parent instead.
        common = os.path.dirname(common)
    out: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            rel = ":".join(os.path.relpath(p, common) for p in value.split(":"))
            out.append(f"{key}={rel}")
        elif key in _OVERLAY_PATH_OPTIONS:
            out.append(f"{key}={os.path.relpath(value, common)}")
        else:
            out.append(opt)
    return common, ",".join(out)


def _fits(data: str) -> bool:
    # The kernel copies at most one page including the terminating NUL.
    return len(data.encode()) < PAGE_SIZE


def overlay_data_fits(m: Mount) -> bool:
    """True when ``mount_all`` can mount overlay ``m`` (absolute or relative form)."""
    lowers = m.option("lowerdir")
    if lowers is not None and len(lowers.split(":")) > MAX_OVERLAY_LOWERS:
        return False
    _, _, data = _split_options(m)
    if _fits(",".join(data)):
        return True
    return _fits(_relative_overlay_data(data)[1])


def _mount_in_dir(cwd: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) with relative paths resolved against ``cwd``, from a private-cwd thread."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _check(_libc.unshare(_CLONE_FS), "unshare(CLONE_FS)")
            os.chdir(cwd)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=run, name="ociworker-mount")
    t.start()
    t.join()
    if failure:
        raise failure[0]


#: a mount of this type is made by the fuse-overlayfs binary (the rootless
#: snapshotter where the kernel's overlayfs cannot mount); umount2 ends it
FUSE_OVERLAY = "fuse-overlayfs"


def _mount_fuse_overlay(m: Mount, target: str) -> None:
    # Its options travel on the command line: no page limit, no relative paths.
    opts = ",".join(o for o in m.options if o not in ("rw", "ro"))
    done = subprocess.run(
        [FUSE_OVERLAY, "-o", opts, target], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        # it prints "unknown argument ignored" notes before the reason
        why = [ln for ln in done.stderr.splitlines() if "unknown argument ignored" not in ln]
        raise HostError(f"fuse-overlayfs on {target} failed: {' '.join(why) or done.returncode}")


def _mount_one(m: Mount, target: str) -> None:
    if m.type == FUSE_OVERLAY:
        _mount_fuse_overlay(m, target)
        return
    flags, readonly, data = _split_options(m)
    if flags & _MS_BIND:
        if data:
            raise UnsupportedError(f"bind mount options not supported: {data}")
        _sys_mount(m.source, target, None, flags, None)
        if readonly:
            # A bind ignores MS_RDONLY on creation; it takes a remount to apply it.
            for opt in locked_options(target):
                flags |= _FLAGS[opt][0]
            _sys_mount("", target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags, None)
        return
    if readonly:
        flags |= _MS_RDONLY
    text = ",".join(data)
    if _fits(text):
        _sys_mount(m.source, target, m.type, flags, text)
        return
    if m.type != "overlay":
        raise HostError(f"mount options of {m.type} on {target} exceed {PAGE_SIZE} bytes")
    common, rel = _relative_overlay_data(data)
    if not common or not _fits(rel):
        raise HostError(
            f"overlay options on {target} exceed {PAGE_SIZE} bytes even with relative paths; "
            "the snapshotter must flatten this chain"
        )
    _mount_in_dir(common, m.source, target, m.type, flags, rel)


def mount_all(mounts: Sequence[Mount], target: Path) -> None:
    """Mount ``mounts`` in order: a mount with an empty target goes on ``target``,
    others below it (resolved with ``secure_join``). All or nothing."""
    done: list[str] = []
    try:
        for m in mounts:
            where = os.fspath(secure_join(target, m.target) if m.target else target)
            try:
                _mount_one(m, where)
            except OSError as exc:
                raise HostError(str(exc)) from exc
            done.append(where)
    except BaseException:
        for where in reversed(done):
            unmount(Path(where))
        raise


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountpoints_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` from /proc/self/mountinfo, in mount order."""
    base = os.path.realpath(path)
    prefix = base.rstrip("/") + "/"
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape(line.split(" ", 5)[4])
            if point == base or point.startswith(prefix):
                found.append(point)
    return found


def unmount(target: Path) -> None:
    """Unmount everything mounted at or below ``target``, newest first.

    A busy mount (a process still has a file open in it) is detached lazily: it
    vanishes from the tree now and the kernel frees it when the last user goes.
    """
    for point in reversed(mountpoints_under(target)):
        raw = point.encode()
        if _libc.umount2(raw, 0) == 0:
            continue
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            continue  # already gone (a parent's lazy detach took it)
        if err == errno.EBUSY and _libc.umount2(raw, _MNT_DETACH) == 0:
            continue
        err = ctypes.get_errno()
        raise HostError(f"unmount {point}: {os.strerror(err)}")


def unmount_below(root: Path) -> int:
    """Unmount everything strictly below ``root`` (the root may itself be a
    mount); how many mount points there were."""
    base = os.path.realpath(root)
    points = [p for p in mountpoints_under(root) if p != base]
    for point in reversed(points):
        with contextlib.suppress(FileNotFoundError):
            unmount(Path(point))
    return len(points)


def _cleanup(path: Path) -> None:
    unmount(path)
    # rmdir, never rmtree: if anything were still mounted here, rmtree would
    # delete the contents of a snapshot.
    path.rmdir()


_pending: set[asyncio.Task[None]] = set()


async def _settle(mounting: asyncio.Future[None], path: Path) -> None:
    # Wait for a mount still running in its thread before undoing it, else a
    # cancelled caller would leave it mounted.
    await asyncio.wait([mounting])
    if not mounting.cancelled():
        mounting.exception()  # the caller saw it already; mark it retrieved
    await asyncio.to_thread(_cleanup, path)


@contextlib.contextmanager
def temp_mounted(mounts: Sequence[Mount], scratch_dir: Path) -> Iterator[Path]:
    """``mounted`` for code that already runs in a thread (the differ)."""
    path = Path(tempfile.mkdtemp(dir=scratch_dir, prefix="mnt-"))
    try:
        mount_all(mounts, path)
        yield path
    finally:
        _cleanup(path)


@contextlib.asynccontextmanager
async def mounted(mounts: Sequence[Mount], scratch_dir: Path) -> AsyncIterator[Path]:
    """Mount ``mounts`` on a fresh dir under ``scratch_dir``; always unmount and remove it."""
    path = Path(await asyncio.to_thread(tempfile.mkdtemp, dir=scratch_dir, prefix="mnt-"))
    mounting = asyncio.ensure_future(asyncio.to_thread(mount_all, mounts, path))
    try:
        await asyncio.shield(mounting)
        yield path
    finally:
        task = asyncio.ensure_future(_settle(mounting, path))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
        await asyncio.shield(task)


class HostMounter:
    """``snapshot.base.Mounter`` on the host: mount points are made under ``scratch_dir``."""

    def __init__(self, scratch_dir: Path) -> None:
        self.scratch_dir = scratch_dir

    def mounted(self, mounts: Sequence[Mount]) -> contextlib.AbstractAsyncContextManager[Path]:
        return mounted(mounts, self.scratch_dir)
