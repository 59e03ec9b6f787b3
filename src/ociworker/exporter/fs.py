"""Filesystem outputs: copy the final tree into a directory, or stream it as tar.

``export_local`` writes through directory file descriptors opened with
``O_NOFOLLOW``: every entry is created relative to the fd of its parent, so a
symlink already in ``dest`` (or planted there during the copy) can never
redirect a write outside it. That is the race-free form of resolving each path
with ``fsutil.secure_join``; ``secure_join`` is still used to place hardlinks.

Both functions block; async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ociworker.errors import HostError, UnsafePathError
from ociworker.fs.oserror import os_error_text
from ociworker.fs.paths import secure_join
from ociworker.fs.userns import rootless

_COPY_BUF = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def export_local(src_root: Path, dest: Path) -> None:
    """Copy the tree under ``src_root`` into ``dest`` (created if missing).

    Existing entries of ``dest`` that collide with the tree are replaced;
    others are left alone. Modes, symlinks, hardlinks, device nodes, xattrs and
    mtimes are kept; ownership too when running as root. Sockets are left out.
    """
    dest.mkdir(parents=True, exist_ok=True)
    # dest itself may be a symlink the caller chose; only what is below it is
    # untrusted, so the root is the one path opened with symlinks followed.
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _LocalCopy(dest, root_fd).copy_dir(os.fspath(src_root), root_fd, ())
    finally:
        os.close(root_fd)


def export_tar(src_root: Path, out: IO[bytes]) -> None:
    """Write the tree under ``src_root`` to ``out`` as a PAX tar stream.

    Entries are in sorted depth-first order, names relative without ``./``;
    the root directory itself is not an entry (as in layer tars). Mtimes are
    exact to the nanosecond (PAX). Sockets are the one file type tar cannot
    hold, so they are left out (``export_local`` leaves them out too).
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _walk(os.fspath(src_root), ""):
            info = tar.gettarinfo(path, arcname=rel)
            if info is None:  # a socket
                continue
            # The tree's names belong to its own /etc/passwd, not the host's.
            info.uname = info.gname = ""
            # The exact mtime (tarfile would write a float, off by up to a microsecond),
            # so extracting the stream gives what export_local copies.
            info.pax_headers = {"mtime": _pax_time(os.lstat(path).st_mtime_ns)}
            xattrs = _xattrs(path, info.issym())
            if xattrs:
                # Binary values (file capabilities) survive as raw bytes: tarfile
                # marks the record hdrcharset=BINARY and writes the surrogates back.
                info.pax_headers = {
                    **info.pax_headers,
                    **{
                        "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs
                    },
                }
            if info.isreg():
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def _pax_time(ns: int) -> str:
    sec, frac = divmod(abs(ns), 1_000_000_000)
    return f"{'-' if ns < 0 else ''}{sec}.{frac:09d}"


def _walk(root: str, rel: str) -> Iterator[tuple[str, str]]:
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        child = f"{rel}/{e.name}" if rel else e.name
        yield child, e.path
        if e.is_dir(follow_symlinks=False):
            yield from _walk(root, child)


class _LocalCopy:
    def __init__(self, dest: Path, root_fd: int) -> None:
        self.dest = dest
        self.root_fd = root_fd
        # A rootless worker is root only of its namespace: files it gave image
        # owners (200999 on the host for 1000) would be the user's no more.
        self.as_root = os.geteuid() == 0 and not rootless()
        # (st_dev, st_ino) of multiply-linked sources -> their path below dest
        self.links: dict[tuple[int, int], tuple[str, ...]] = {}

    def copy_dir(self, src_dir: str, dst_fd: int, rel: tuple[str, ...]) -> None:
        with os.scandir(src_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fd = self._make_dir(dst_fd, e.name)
                try:
                    self.copy_dir(e.path, fd, (*rel, e.name))
                    # Last, so that creating children does not bump the mtime and a
                    # read-only mode does not stop them from being written.
                    self._fd_meta(fd, e.path, st)
                finally:
                    os.close(fd)
                continue
            _remove(dst_fd, e.name)
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                self._link(self.links[key], dst_fd, e.name)
                continue
            self._copy_entry(e.path, st, dst_fd, e.name)
            if st.st_nlink > 1:
                self.links[key] = (*rel, e.name)

    def _copy_entry(self, src: str, st: os.stat_result, dst_fd: int, name: str) -> None:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dst_fd,
            )
            try:
                src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(src_fd, "rb") as fin, open(fd, "wb", closefd=False) as fout:
                    shutil.copyfileobj(fin, fout, _COPY_BUF)
                self._fd_meta(fd, src, st)
            finally:
                os.close(fd)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), name, dir_fd=dst_fd)
            self._path_meta(dst_fd, name, st, chmod=False)
        elif stat.S_ISSOCK(mode):
            # A socket is no content; tar (export_tar, layers) cannot carry one either,
            # so the directory and the tar form of the output stay the same tree.
            return
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            try:
                os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst_fd)
            except PermissionError as e:
                raise HostError(
                    f"cannot export device node {src} without root: {os_error_text(e)}"
                ) from e
            self._path_meta(dst_fd, name, st, chmod=True)
        else:
            raise HostError(f"cannot export {src}: unknown file type {stat.S_IFMT(mode):o}")

    def _make_dir(self, dst_fd: int, name: str) -> int:
        try:
            st = os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dst_fd)
            st = None
        if st is None:
            # Private until its final mode is set after the copy, so nobody else
            # can add entries (or symlinks) to it meanwhile.
            os.mkdir(name, 0o700, dir_fd=dst_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dst_fd)

    def _link(self, target: tuple[str, ...], dst_fd: int, name: str) -> None:
        # The first copy's directory must still be a real directory below dest;
        # secure_join names where it would really resolve to.
        want = Path(self.dest, *target[:-1])
        if secure_join(self.dest, "/".join(target[:-1])) != want:
            raise UnsafePathError(f"{want} stopped being a directory during export")
        parent = self._open_below(target[:-1])
        try:
            os.link(target[-1], name, src_dir_fd=parent, dst_dir_fd=dst_fd, follow_symlinks=False)
        finally:
            os.close(parent)

    def _open_below(self, parts: tuple[str, ...]) -> int:
        fd = os.dup(self.root_fd)
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            finally:
                os.close(fd)
            fd = nxt
        return fd

    def _fd_meta(self, fd: int, src: str, st: os.stat_result) -> None:
        if self.as_root:
            os.fchown(fd, st.st_uid, st.st_gid)
        # After chown: chown clears the set-id bits.
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        for key, value in _xattrs(src, False):
            try:
                os.setxattr(fd, key, value)
            except OSError as e:
                raise HostError(
                    f"cannot set xattr {key} while exporting {src}: {os_error_text(e)}"
                ) from e
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _path_meta(self, dst_fd: int, name: str, st: os.stat_result, *, chmod: bool) -> None:
        if self.as_root:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
        if chmod:
            # Linux has no lchmod and fchmod refuses O_PATH fds; chmod through the
            # fd's /proc link acts on the inode we opened, never on a symlink
            # swapped in under the name since.
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_fd)
            try:
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode))
            finally:
                os.close(fd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)


def _remove(dst_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dst_fd)
    else:
        os.unlink(name, dir_fd=dst_fd)


def _xattrs(path: str, is_symlink: bool) -> list[tuple[str, bytes]]:
    if is_symlink:
        # Only trusted.* and security.* can exist on a symlink, and no image
        # format carries them; reading them would need CAP_SYS_ADMIN anyway.
        return []
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    return [(k, os.getxattr(path, k, follow_symlinks=False)) for k in sorted(keys)]
