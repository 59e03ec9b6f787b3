"""ADD's local archive extraction: detect a (compressed) tar and unpack it safely.

Compression is told by magic bytes, never by file name, as BuildKit's
``archiveutil.DetectCompression`` does; a file is an archive only when its first tar
header parses after decompression (BuildKit's ``isArchivePath``), so a gzipped text
file is copied as it is.

Extraction is not ``diff.apply``: an ADD archive is user data, so ``.wh.`` names are
plain files and nothing is deleted on their account. Every entry name is cleaned and
must stay below the destination directory; its parent is resolved with
``secure_join`` against the *snapshot root*, so a symlink planted by an earlier entry
is followed as the container would follow it and can never lead outside the snapshot.
A hardlink may only point at an entry this same archive wrote.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from ociworker.diff.tarutil import BoundedTarInfo, check_reserve, disk_reserve, iter_members
from ociworker.errors import UnsafePathError, UnsupportedError, UserError
from ociworker.fs.paths import clean, secure_join


class Compression(Enum):
    NONE = "none"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    ZSTD = "zstd"


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def detect_compression(head: bytes) -> Compression:
    """The compression of a stream whose first bytes are ``head`` (at least 6 wanted)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return Compression.GZIP
    if head.startswith(b"BZh"):
        return Compression.BZIP2
    if head.startswith(b"\xfd7zXZ\x00"):
        return Compression.XZ
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    # A zstd stream may open with skippable frames (magic 0x184D2A50..5F, little endian).
    if len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
        return Compression.ZSTD
    return Compression.NONE


@contextlib.contextmanager
def open_decompressed(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading, decompressed by what its magic bytes say."""
    with open(path, "rb") as raw:
        kind = detect_compression(raw.read(6))
        raw.seek(0)
        if kind is Compression.NONE:
            yield raw
        elif kind is Compression.GZIP:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield cast(BinaryIO, gz)
        elif kind is Compression.BZIP2:
            with bz2.BZ2File(raw, "rb") as bz:
                yield cast(BinaryIO, bz)
        elif kind is Compression.XZ:
            with lzma.LZMAFile(raw, "rb") as xz:
                yield cast(BinaryIO, xz)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with reader:
                yield cast(BinaryIO, reader)


# Decompressors and tarfile report damage with several unrelated exception types.
_CORRUPT = (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zstandard.ZstdError)


def is_tar_archive(path: Path) -> bool:
    """True when ``path`` is a regular file holding a tar stream, plain or compressed."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with (
            open_decompressed(path) as stream,
            tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo) as tf,
        ):
            return tf.next() is not None
    except _CORRUPT:
        return False


@dataclass(frozen=True)
class ArchiveOwner:
    """``--chown`` of an ADD: replaces the owner of every extracted entry."""

    uid: int
    gid: int


def _member_name(name: str, what: str) -> str:
    """An entry name made relative and clean; '' for the destination itself.

    A name that climbs out with ``..`` is refused rather than clamped: an archive that
    tries it is hostile or broken, and BuildKit and Docker both refuse it too."""
    stripped = name.lstrip("/")
    out = posixpath.normpath(stripped) if stripped else "."
    if out == ".":
        return ""
    if out == ".." or out.startswith("../"):
        raise UnsafePathError(f"ADD: archive {what} {name!r} is outside the extraction root")
    return out


#: how often (bytes of one file) the disk reserve is looked at: far less than
#: the smallest reserve, or the check could come only after the disk was full
_CHECK_BYTES = 1 << 20


class _Extractor:
    def __init__(self, root: Path, dest: str, owner: ArchiveOwner | None) -> None:
        self.root = root
        self.dest = clean(dest)
        self.owner = owner
        # Without privilege an archive's owners cannot be kept (tar's --no-same-owner).
        self.same_owner = owner is None and os.geteuid() == 0
        self.written: set[Path] = set()
        self.dirs: list[tuple[Path, tarfile.TarInfo]] = []
        # the same disk reserve as a layer's (diff.tarutil): an archive of
        # zeros, a MiB gzipped, must not take the last blocks of the worker's disk
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.reserve = disk_reserve(fd)
        finally:
            os.close(fd)

    def ids(self, m: tarfile.TarInfo | None) -> tuple[int, int] | None:
        if self.owner is not None:
            return self.owner.uid, self.owner.gid
        if not self.same_owner:
            return None
        return (m.uid, m.gid) if m is not None else (0, 0)

    def target(self, rel: str, follow_leaf: bool) -> Path:
        full = posixpath.join(self.dest, rel)
        if follow_leaf:
            return secure_join(self.root, full)
        parent = secure_join(self.root, posixpath.dirname(full))
        return parent / posixpath.basename(full)

    def make_parents(self, path: Path) -> None:
        missing: list[Path] = []
        p = path.parent
        while p != self.root and not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        if not p.is_dir() or p.is_symlink():
            raise UserError(f"ADD: cannot extract below {self.shown(p)}: not a directory")
        ids = self.ids(None)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            if ids is not None:
                os.lchown(d, *ids)

    def shown(self, p: Path) -> str:
        return "/" + str(p.relative_to(self.root)) if p != self.root else "/"

    def extract(self, tf: tarfile.TarFile) -> None:
        for m in iter_members(tf):
            rel = _member_name(m.name, "path")
            if not rel:
                continue
            path = self.target(rel, follow_leaf=m.isdir())
            self.make_parents(path)
            self.clear(path, m.isdir())
            if m.isdir():
                if not os.path.lexists(path):
                    os.mkdir(path, 0o700)  # final mode once its contents are written
                self.chown(path, m)
                self.dirs.append((path, m))
            elif m.isreg():
                self.write_file(tf, m, path)
            elif m.issym():
                os.symlink(m.linkname, path)
                self.chown(path, m)
                self.settime(path, m)
            elif m.islnk():
                self.link(m, path)
            elif m.isfifo() or m.ischr() or m.isblk():
                self.mknod(m, path)
            else:
                raise UserError(f"ADD: unsupported entry {m.name!r} (type {m.type!r}) in archive")
            self.xattrs(path, m)
            self.written.add(path)
        # Parents last, so their mtimes survive the writes into them and a read-only
        # mode cannot block them.
        for path, m in reversed(self.dirs):
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, m.mode & 0o7777)
                self.settime(path, m)

    @staticmethod
    def clear(path: Path, new_is_dir: bool) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not new_is_dir:
                shutil.rmtree(path)
        else:
            os.unlink(path)

    def write_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> None:
        data = tf.extractfile(m)
        if data is None:
            raise UserError(f"ADD: archive entry {m.name!r} has no data")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            written = 0
            while chunk := data.read(1 << 20):
                out.write(chunk)
                written += len(chunk)
                if written % _CHECK_BYTES < len(chunk):
                    out.flush()
                    check_reserve(fd, self.reserve, f"ADD: archive entry {m.name!r}")
        self.chown(path, m)
        os.chmod(path, m.mode & 0o7777)  # after chown, which clears set-id bits
        self.settime(path, m)

    def link(self, m: tarfile.TarInfo, path: Path) -> None:
        rel = _member_name(m.linkname, "hardlink target")
        if not rel:
            raise UnsafePathError(f"ADD: archive hardlink {m.name!r} targets the extraction root")
        target = self.target(rel, follow_leaf=False)
        if target not in self.written:
            raise UnsafePathError(
                f"ADD: archive hardlink {m.name!r} -> {m.linkname!r} does not point at "
                "an entry of the same archive"
            )
        os.link(target, path, follow_symlinks=False)

    def mknod(self, m: tarfile.TarInfo, path: Path) -> None:
        kind = stat.S_IFIFO if m.isfifo() else stat.S_IFCHR if m.ischr() else stat.S_IFBLK
        try:
            os.mknod(path, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor))
        except PermissionError:
            raise UnsupportedError(
                f"ADD: cannot create device {m.name!r} from the archive without privilege"
            ) from None
        self.chown(path, m)
        os.chmod(path, m.mode & 0o7777)
        self.settime(path, m)

    def chown(self, path: Path, m: tarfile.TarInfo) -> None:
        ids = self.ids(m)
        if ids is not None:
            os.lchown(path, *ids)

    @staticmethod
    def settime(path: Path, m: tarfile.TarInfo) -> None:
        ns = max(int(m.mtime * 1_000_000_000), 0)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)

    @staticmethod
    def xattrs(path: Path, m: tarfile.TarInfo) -> None:
        for key, value in m.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                # Like BuildKit, a filesystem that refuses an xattr does not fail the build.
                with contextlib.suppress(OSError):
                    os.setxattr(
                        path,
                        key.removeprefix("SCHILY.xattr."),
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )


def extract_archive(
    archive: Path, root: Path, dest: str, owner: ArchiveOwner | None = None
) -> None:
    """Unpack the tar ``archive`` into the directory ``dest`` (a path inside the
    snapshot mounted at ``root``), which must exist. Entries keep the archive's
    owners (when we may chown) unless ``owner`` is given."""
    ex = _Extractor(root, dest, owner)
    try:
        with (
            open_decompressed(archive) as stream,
            tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo) as tf,
        ):
            ex.extract(tf)
    except (UserError, UnsupportedError):
        raise
    except (tarfile.TarError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise UserError(f"ADD: archive {archive.name!r} is damaged: {exc}") from None
