"""Applier: extract a layer blob onto a snapshot, never writing outside it.

Every entry goes through the same steps:

1. its name is cleaned lexically with ``..`` and ``/`` clamped at the root
   (``../../x`` and ``/x`` both mean ``<root>/x``), as containerd does;
2. its parent is resolved with ``secure_join`` (symlinks followed as if the
   root were ``/``) and then opened one component at a time with
   ``O_NOFOLLOW`` from a descriptor of the root, creating missing dirs;
3. the final component is created relative to that parent descriptor with
   exclusive, no-follow semantics after removing whatever was there (a dir
   over a dir is kept and only its metadata updated).

Hardlink targets must be relative and stay inside the root; whiteouts whose
target is empty, ``.`` or ``..`` are rejected. Directory modes and times are
set last, so a read-only dir can still receive its children and its mtime is
not disturbed by them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Protocol, cast

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.mounts import Mount
from ociworker.core.oci import ANNOTATION_UNCOMPRESSED, Descriptor
from ociworker.diff.tarutil import (
    CHUNK,
    DECOMPRESS_ERRORS,
    WHITEOUT_META_PREFIX,
    WHITEOUT_OPAQUE,
    WHITEOUT_PREFIX,
    XATTR_PAX_PREFIX,
    BoundedTarInfo,
    DecompressingPipe,
    ForwardReader,
    bomb_limit,
    check_reserve,
    disk_reserve,
    is_overlay_xattr,
    iter_members,
    map_os_error,
    mounted,
    parse_mounts,
    remove_scratch,
)
from ociworker.errors import (
    DigestMismatchError,
    HostError,
    UnsafePathError,
    UnsupportedError,
    UserError,
)
from ociworker.fs.paths import clean, secure_join
from ociworker.fs.userns import in_user_namespace

__all__ = ["LayerApplier", "apply_tar_stream"]

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SupportsRead(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class LayerApplier:
    """``Applier`` onto bind (native or base) and active overlay snapshots.

    ``scratch_dir`` is where a temporary mount point for an overlay snapshot
    is made; None means the system temp dir.
    """

    def __init__(self, store: ContentStore, *, scratch_dir: Path | None = None) -> None:
        self._store = store
        self._scratch = scratch_dir

    async def apply(self, layer: Descriptor, mounts: Sequence[Mount]) -> Digest:
        return await asyncio.to_thread(self.apply_sync, layer, mounts)

    def apply_sync(self, layer: Descriptor, mounts: Sequence[Mount]) -> Digest:
        view = parse_mounts(mounts)
        if view.kind == "empty":
            raise UserError("apply: the snapshot has no mounts")
        if view.kind == "dir" and "ro" in view.options:
            raise UserError("apply: the snapshot is mounted read-only")
        if self._scratch is not None:
            self._scratch.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="apply-", dir=self._scratch)
        try:
            with mounted(view, scratch, writable=True) as root:
                return apply_blob(self._store, layer, Path(root))
        finally:
            remove_scratch(scratch)


def apply_blob(store: ContentStore, layer: Descriptor, root: Path) -> Digest:
    """Extract blob ``layer`` from ``store`` onto directory ``root``; its diffID."""
    with store.open(layer.digest) as raw:
        what = f"layer {layer.digest}"
        tar_stream = DecompressingPipe(
            raw, layer.media_type, limit=bomb_limit(layer.size), what=what
        )
        try:
            _Extractor(root, reserve_for=what).run(tar_stream)
            # the diffID covers the whole uncompressed stream, including the
            # padding after the end-of-archive blocks that tarfile never reads
            tar_stream.drain()
        except DECOMPRESS_ERRORS as e:
            raise UserError(f"layer {layer.digest}: corrupt compressed stream: {e}") from e
        finally:
            tar_stream.close()
    if tar_stream.blob_digest != layer.digest or tar_stream.blob_size != layer.size:
        raise DigestMismatchError(
            f"layer blob {layer.digest} ({layer.size} bytes) read back as "
            f"{tar_stream.blob_digest} ({tar_stream.blob_size} bytes); the snapshot it was "
            "applied to is invalid"
        )
    want = dict(layer.annotations).get(ANNOTATION_UNCOMPRESSED)
    if want is not None and want != tar_stream.digest:
        raise DigestMismatchError(
            f"layer {layer.digest}: diffID {tar_stream.digest} does not match {want}"
        )
    return tar_stream.digest


def apply_tar_stream(
    fileobj: SupportsRead | IO[bytes], root: Path, *, whiteouts: bool = True
) -> None:
    """Extract an uncompressed layer tar read from ``fileobj`` onto ``root``.

    ``whiteouts=False`` extracts a plain tree (a ``type=local`` output streamed as
    tar): ``.wh.`` names are ordinary files there, never deletions."""
    _Extractor(root, whiteouts=whiteouts).run(fileobj)


@dataclass(frozen=True)
class _DirMeta:
    mode: int
    atime_ns: int
    mtime_ns: int


class _Extractor:
    """``reserve_for`` names what is extracted (a layer) when the disk reserve of
    ``tarutil.check_reserve`` applies; an output the user asked for (a local
    export) gets the whole disk, as any copy would."""

    #: how often (entries, bytes of one file) the disk reserve is looked at: far
    #: less than the smallest reserve, or a check could come only after the disk
    #: was full (an fstatvfs per MiB written costs nothing against the write)
    _CHECK_ENTRIES = 256
    _CHECK_BYTES = 1 << 20

    def __init__(self, root: Path, *, whiteouts: bool = True, reserve_for: str = "") -> None:
        self.root = os.path.realpath(root)
        self.whiteouts = whiteouts
        self.reserve_for = reserve_for
        self.reserve = 0
        #: device nodes a rootless worker left out (see ``_create``)
        self.skipped_devices: list[str] = []
        self.entries = 0
        if reserve_for:
            fd = os.open(self.root, _DIR_PATH)
            try:
                self.reserve = disk_reserve(fd)
            finally:
                os.close(fd)
        self.privileged = os.geteuid() == 0
        # resolved paths (relative to root) this layer wrote, and their
        # ancestors: an opaque marker must not remove them
        self.unpacked: set[str] = set()
        self.dirs: dict[str, _DirMeta] = {}
        # _resolve's answers, kept while this layer only adds files and dirs (which
        # resolve the same before and after they exist); cleared by anything that
        # makes or removes a symlink. Never the safety net: _open_dirs still walks
        # every component with O_NOFOLLOW.
        self._resolved: dict[str, str] = {}

    # --- driver ----------------------------------------------------------------

    def run(self, fileobj: SupportsRead | IO[bytes]) -> None:
        try:
            # the ordinary mode over a forward-only reader: see ForwardReader
            src = cast(IO[bytes], ForwardReader(fileobj))
            with tarfile.TarFile(fileobj=src, mode="r", tarinfo=BoundedTarInfo) as tar:
                for member in iter_members(tar):
                    try:
                        self._entry(tar, member)
                    except OSError as e:
                        raise map_os_error(f"layer entry {member.name!r}", e) from e
                    except UnsafePathError as e:
                        # a hostile layer is reported by the entry a user can find in it
                        if repr(member.name) in str(e):
                            raise
                        raise UnsafePathError(f"layer entry {member.name!r}: {e}") from e
        except tarfile.TarError as e:
            raise UserError(f"corrupt layer tar: {e}") from e
        self._finish_dirs()

    def _check_reserve(self, fd: int | None = None) -> None:
        if not self.reserve_for:
            return
        if fd is not None:
            check_reserve(fd, self.reserve, self.reserve_for)
            return
        rfd = os.open(self.root, _DIR_PATH)
        try:
            check_reserve(rfd, self.reserve, self.reserve_for)
        finally:
            os.close(rfd)

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries % self._CHECK_ENTRIES == 0:
            self._check_reserve()
        rel = clean(m.name).lstrip("/")
        parent_rel, base = posixpath.split(rel)
        if self.whiteouts and base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent_rel, base, m.name)
            return
        if rel == "":
            if not m.isdir():
                raise UnsafePathError(f"layer entry {m.name!r} would replace the root")
            self._root_meta(m)
            return
        parent = self._resolve(parent_rel)
        pfd = self._open_dirs(parent, create=True)
        try:
            self._create(tar, m, pfd, parent, base)
        finally:
            os.close(pfd)

    # --- path resolution ---------------------------------------------------------

    def _resolve(self, rel: str) -> str:
        """``rel`` with symlinks resolved inside the root, relative to the root."""
        hit = self._resolved.get(rel)
        if hit is not None:
            return hit
        p = os.fspath(secure_join(self.root, rel))
        out = os.path.relpath(p, self.root)
        if out == ".":
            out = ""
        if out == ".." or out.startswith("../"):  # secure_join guarantees this never happens
            raise UnsafePathError(f"{rel!r} resolves outside the root")
        self._resolved[rel] = out
        return out

    def _open_dirs(self, rel: str, *, create: bool, flags: int = _DIR_PATH) -> int:
        """A descriptor of directory ``rel`` (resolved), walked from the root one
        component at a time without following any symlink."""
        fd = os.open(self.root, _DIR_PATH)
        try:
            parts = rel.split("/") if rel else []
            done: list[str] = []
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                want = flags if last else _DIR_PATH
                try:
                    nfd = os.open(part, want, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, want, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise UserError(
                            f"layer path {'/'.join([*done, part])!r} is not a directory"
                        ) from e
                    raise
                os.close(fd)
                fd = nfd
                done.append(part)
            if not parts and flags != _DIR_PATH:
                nfd = os.open(".", flags, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _mark(self, rel: str) -> None:
        while rel and rel not in self.unpacked:
            self.unpacked.add(rel)
            rel = posixpath.dirname(rel)

    # --- entries -----------------------------------------------------------------

    def _create(
        self, tar: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, parent: str, base: str
    ) -> None:
        rel = posixpath.join(parent, base)
        link_src: tuple[str, str] | None = None
        if m.islnk():
            link_src = self._link_source(m.linkname)
            if posixpath.join(*link_src) == rel:
                self._mark(rel)  # a link to itself: the file is already there
                return
        try:
            existing: os.stat_result | None = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and m.isdir()):
            self._resolved.clear()
            _remove(pfd, base, existing)
        self._mark(rel)
        mode = stat.S_IMODE(m.mode)
        if m.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(base, 0o700, dir_fd=pfd)
            dfd = os.open(base, _DIR_READ, dir_fd=pfd)
            try:
                self._owner_xattrs_fd(dfd, m)
            finally:
                os.close(dfd)
            self.dirs[rel] = _DirMeta(mode, *_times_ns(m))
        elif m.isreg():
            fd = os.open(
                base,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
            try:
                src = tar.extractfile(m)
                if src is not None:
                    self._copy(src, fd)
                self._owner_xattrs_fd(fd, m)
                os.fchmod(fd, mode)
                os.utime(fd, ns=_times_ns(m))
            finally:
                os.close(fd)
        elif m.issym():
            self._resolved.clear()
            os.symlink(m.linkname, base, dir_fd=pfd)
            self._meta_at(pfd, base, m, chmod=False)
        elif m.islnk():
            assert link_src is not None
            sparent, sbase = link_src
            self._resolved.clear()  # a hardlink to a symlink is a symlink
            sfd = self._open_dirs(sparent, create=False)
            try:
                os.link(sbase, base, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(sfd)
        elif m.ischr() or m.isblk() or m.isfifo():
            try:
                if m.isfifo():
                    os.mkfifo(base, 0o600, dir_fd=pfd)
                else:
                    kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                    dev = os.makedev(m.devmajor, m.devminor)
                    os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
            except PermissionError as e:
                if not m.isfifo() and in_user_namespace():
                    # As BuildKit rootless (containerd's and moby's archive code
                    # skip them, logging at debug level): no user namespace may
                    # make a device node, so a base image's /dev entries are left
                    # out; the runtime gives every step its own /dev anyway.
                    self.skipped_devices.append(m.name)
                    return
                raise HostError(f"cannot create device node {m.name!r}: needs root") from e
            self._meta_at(pfd, base, m, chmod=True)
        else:
            raise UnsupportedError(f"layer entry {m.name!r} has unsupported tar type {m.type!r}")

    def _copy(self, src: IO[bytes], fd: int) -> None:
        written = 0
        while data := src.read(CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            written += len(data)
            if written % self._CHECK_BYTES < len(data):
                self._check_reserve(fd)

    def _link_source(self, linkname: str) -> tuple[str, str]:
        """(resolved parent, name) of a hardlink's target inside the root."""
        if linkname.startswith("/"):
            raise UnsafePathError(f"hardlink target {linkname!r} is absolute")
        norm = posixpath.normpath(linkname)
        if norm == ".." or norm.startswith("../"):
            raise UnsafePathError(f"hardlink target {linkname!r} leaves the root")
        if norm in (".", ""):
            raise UserError(f"hardlink target {linkname!r} is the root directory")
        parent_rel, name = posixpath.split(norm)
        parent = self._resolve(parent_rel)
        try:
            pfd = self._open_dirs(parent, create=False)
        except FileNotFoundError:
            raise UserError(f"hardlink target {linkname!r} does not exist") from None
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise UserError(f"hardlink target {linkname!r} does not exist") from None
        finally:
            os.close(pfd)
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"hardlink target {linkname!r} is a directory")
        return parent, name

    def _whiteout(self, parent_rel: str, base: str, name: str) -> None:
        self._resolved.clear()
        if base == WHITEOUT_OPAQUE:
            self._opaque(parent_rel)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk, ...): not part of the tree
        victim = base[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", ".."):
            raise UnsafePathError(f"whiteout {name!r} names no entry")
        try:
            pfd = self._open_dirs(self._resolve(parent_rel), create=False)
        except (FileNotFoundError, UserError):
            return  # nothing below a missing or non-dir parent to remove
        try:
            st = os.stat(victim, dir_fd=pfd, follow_symlinks=False)
            _remove(pfd, victim, st)
        except FileNotFoundError:
            pass
        finally:
            os.close(pfd)

    def _opaque(self, parent_rel: str) -> None:
        parent = self._resolve(parent_rel)
        try:
            dfd = self._open_dirs(parent, create=False, flags=_DIR_READ)
        except (FileNotFoundError, UserError):
            return
        try:
            for child in os.listdir(dfd):
                if posixpath.join(parent, child) in self.unpacked:
                    continue
                st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
                _remove(dfd, child, st)
        finally:
            os.close(dfd)

    def _root_meta(self, m: tarfile.TarInfo) -> None:
        fd = os.open(self.root, _DIR_READ)
        try:
            self._owner_xattrs_fd(fd, m)
        finally:
            os.close(fd)
        self.dirs[""] = _DirMeta(stat.S_IMODE(m.mode), *_times_ns(m))

    # --- metadata ------------------------------------------------------------------

    def _owner_xattrs_fd(self, fd: int, m: tarfile.TarInfo) -> None:
        if self.privileged:
            os.fchown(fd, m.uid, m.gid)
        for name, value in _xattrs(m):
            self._setxattr(fd, name, value)

    def _meta_at(self, pfd: int, base: str, m: tarfile.TarInfo, *, chmod: bool) -> None:
        """Metadata of an entry that cannot be opened (symlink, device, fifo)."""
        if self.privileged:
            os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        # setxattr has no dir_fd form; the /proc magic link pins the parent we hold
        path = f"/proc/self/fd/{pfd}/{base}"
        for name, value in _xattrs(m):
            self._setxattr(path, name, value)
        if chmod:
            # just created by mknod/mkfifo, so the name is not a symlink
            os.chmod(base, stat.S_IMODE(m.mode), dir_fd=pfd)
        os.utime(base, ns=_times_ns(m), dir_fd=pfd, follow_symlinks=False)

    def _setxattr(self, target: int | str, name: str, value: bytes) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            # no xattrs on this filesystem, or (unprivileged) a trusted./
            # security. namespace we may not write: keep the file, drop the attr
            if e.errno == errno.ENOTSUP or (e.errno == errno.EPERM and not self.privileged):
                return
            raise

    def _finish_dirs(self) -> None:
        # deepest first, so a parent's read-only mode never blocks a child
        for rel in sorted(self.dirs, key=lambda r: r.count("/") + bool(r), reverse=True):
            meta = self.dirs[rel]
            try:
                fd = self._open_dirs(rel, create=False, flags=_DIR_READ)
            except (FileNotFoundError, UserError):
                continue  # replaced or removed by a later entry of this layer
            try:
                os.fchmod(fd, meta.mode)
                os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))
            finally:
                os.close(fd)


def _remove(dfd: int, name: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _xattrs(m: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in m.pax_headers.items():
        if not key.startswith(XATTR_PAX_PREFIX):
            continue
        name = key[len(XATTR_PAX_PREFIX) :]
        # a layer must not plant overlay bookkeeping: the kernel would obey it
        if is_overlay_xattr(name):
            continue
        yield name, value.encode("utf-8", "surrogateescape")


def _times_ns(m: tarfile.TarInfo) -> tuple[int, int]:
    mtime = _pax_time_ns(m.pax_headers.get("mtime"))
    if mtime is None:
        mtime = int(m.mtime) * 1_000_000_000
    atime = _pax_time_ns(m.pax_headers.get("atime"))
    return (mtime if atime is None else atime), mtime


def _pax_time_ns(text: str | None) -> int | None:
    """A PAX time record in ns, exactly (tarfile parses it into a lossy float)."""
    if text is None:
        return None
    with contextlib.suppress(InvalidOperation, ValueError):
        return int(Decimal(text) * 1_000_000_000)
    return None
