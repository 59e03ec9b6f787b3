"""Helpers shared by the comparer and the applier: the layer blob pipeline, the
PAX entry writer, decompressing readers, xattr handling and temporary mounts.

A layer is written in one pass: tar bytes -> sha256 (diffID) -> compressor ->
content store ingest (which hashes the blob). Nothing holds a whole layer in
memory; every stage works on bounded chunks.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import gzip
import hashlib
import os
import queue
import shutil
import stat
import struct
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, Protocol

import zstandard

from ociworker.content.store import ContentStore, Ingest
from ociworker.core.digest import Digest
from ociworker.core.mounts import Mount, is_bind
from ociworker.core.oci import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Descriptor,
    Layer,
    layer_compression,
)
from ociworker.diff.base import CompressionOpts
from ociworker.errors import ConfigError, HostError, UnsupportedError, UserError
from ociworker.fs.mount import FUSE_OVERLAY, temp_mounted
from ociworker.fs.oserror import os_error_text

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."

#: chunk size of every copy in the pipeline; bounds the memory of one layer. Small
#: enough to stay in cache between the read, the hashes and the write: with 1 MiB a
#: 1 GiB zstd layer took twice the system time (docs/performance.md, "Layer export")
CHUNK = 256 * 1024

# zlib's own default (6) is what Go's gzip.DefaultCompression maps to, which
# is what BuildKit and containerd use when no level is configured.
GZIP_DEFAULT_LEVEL = zlib.Z_DEFAULT_COMPRESSION
ZSTD_DEFAULT_LEVEL = 3
#: bytes of input per libzstd job (see ``_compressor``): part of the blob's bytes
ZSTD_JOB_SIZE = 2 << 20

# --- media types ----------------------------------------------------------------


def layer_media_type(opts: CompressionOpts) -> str:
    if opts.compression == "zstd":
        if not opts.oci_media_types:
            raise ConfigError("zstd compression requires OCI media types")
        return OCI_LAYER_ZSTD
    if opts.compression == "gzip":
        return OCI_LAYER_GZIP if opts.oci_media_types else DOCKER_LAYER_GZIP
    if opts.compression == "uncompressed":
        return OCI_LAYER if opts.oci_media_types else DOCKER_LAYER
    raise ConfigError(f"unknown compression {opts.compression!r}")


# --- write pipeline ---------------------------------------------------------------


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _compressor(opts: CompressionOpts, pool: ThreadPoolExecutor, workers: int) -> _Compressor:
    if opts.compression == "gzip":
        level = GZIP_DEFAULT_LEVEL if opts.level is None else opts.level
        if not (level == -1 or 0 <= level <= 9):
            raise ConfigError(f"gzip level must be 0-9, got {level}")
        return ParallelGzip(level, pool, workers)
    if opts.compression == "zstd":
        level = ZSTD_DEFAULT_LEVEL if opts.level is None else opts.level
        if not (-7 <= level <= 22):
            raise ConfigError(f"zstd level must be -7..22, got {level}")
        # libzstd gives the same frames for any worker count >= 1 (but not for
        # 0), so -1 (one per CPU) keeps blobs reproducible across machines. The job
        # size is fixed too (it shapes the frames): libzstd's own, 4x the window
        # (8 MiB at level 3), held ~60 MiB of job buffers and handed the pipeline
        # 8 MiB pieces: a 1 GiB export peaked at 227 MiB of RSS, with 2 MiB jobs at
        # 101 MiB, as fast and 0.2% larger (docs/performance.md, "Layer export")
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=-1, job_size=ZSTD_JOB_SIZE, write_checksum=1
        )
        cctx = zstandard.ZstdCompressor(compression_params=params)
        obj: _Compressor = cctx.compressobj()
        return obj
    return _Identity()


class ParallelGzip:
    """gzip on all CPUs, laid out like pigz: the stream is cut into fixed
    blocks, each deflated on its own with the previous 32 KiB as dictionary
    and ended with a sync flush, so the concatenation is one valid deflate
    stream. Output depends only on the data, the level and ``BLOCK``, never
    on the number of threads. zlib releases the GIL while it works."""

    BLOCK = 1 << 20
    _WINDOW = 32 * 1024
    # a fixed header (mtime 0, OS unknown as Go writes it): blobs are reproducible
    _HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"

    def __init__(self, level: int, pool: ThreadPoolExecutor, workers: int) -> None:
        self._level = level
        self._pool = pool
        # bounds memory to a few blocks while keeping every worker busy
        self._max_pending = 2 * workers
        self._pending: collections.deque[Future[bytes]] = collections.deque()
        self._buf = bytearray()
        self._tail = b""
        self._crc = 0
        self._size = 0
        self._started = False

    def compress(self, data: bytes, /) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._buf += data
        out: list[bytes] = []
        if not self._started:
            out.append(self._HEADER)
            self._started = True
        while len(self._buf) >= self.BLOCK:
            block = bytes(self._buf[: self.BLOCK])
            del self._buf[: self.BLOCK]
            self._submit(block, final=False)
            if len(self._pending) > self._max_pending:
                out.append(self._pending.popleft().result())
        while self._pending and self._pending[0].done():
            out.append(self._pending.popleft().result())
        return b"".join(out)

    def flush(self) -> bytes:
        out = [] if self._started else [self._HEADER]
        self._started = True
        self._submit(bytes(self._buf), final=True)
        self._buf.clear()
        out.extend(f.result() for f in self._pending)
        self._pending.clear()
        out.append(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
        return b"".join(out)

    def _submit(self, block: bytes, *, final: bool) -> None:
        zdict = self._tail
        self._tail = block[-self._WINDOW :]
        self._pending.append(self._pool.submit(_deflate_block, block, zdict, self._level, final))


#: the probes ``_incompressible`` takes from a block, and the ratio they must miss
_PROBES = 4
_PROBE_SIZE = 16 * 1024
_PROBE_RATIO = 0.9


def _incompressible(block: bytes) -> bool:
    """Whether every probe spread over ``block`` shrinks by less than 10% at level 1.

    Deflate at level 6 spends as long searching already-compressed data
    (archives, media, wheels, random bytes) as it does text, for nothing: such a
    block is stored instead, a few bytes bigger than the data and ~50x faster
    (docs/performance.md, "Layer export"). The 10% lets tar headers between
    such files through (they save a few % and would make every block of a tree
    of media files look compressible). A pure function of the block, so the
    blob stays reproducible; a block with any compressible probe is deflated."""
    if len(block) < _PROBES * _PROBE_SIZE:
        return False
    step = len(block) // _PROBES
    for i in range(_PROBES):
        probe = block[i * step : i * step + _PROBE_SIZE]
        if len(zlib.compress(probe, 1)) < _PROBE_RATIO * len(probe):
            return False
    return True


def _deflate_block(block: bytes, zdict: bytes, level: int, final: bool) -> bytes:
    if level != 0 and _incompressible(block):
        # stored blocks: the dictionary (the previous block's tail) is not needed
        c = zlib.compressobj(0, zlib.DEFLATED, -15)
        return c.compress(block) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
    if zdict:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=zdict)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(block) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


#: glibc's mallopt parameter (malloc.h)
_M_MMAP_THRESHOLD = -3


@functools.cache
def _return_big_buffers() -> None:
    """Keep glibc's mmap threshold at 256 KiB for the rest of the process.

    glibc raises the threshold each time an mmapped block is freed (up to 32 MiB);
    after that the pipeline's 1 MiB chunks come from the heaps of the threads that
    allocate them, which do not shrink: a 1 GiB zstd export then peaked at 285 MiB
    instead of 193 MiB (docs/performance.md, "Layer export"). With a fixed
    threshold every such chunk is mmapped and given back when freed."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 256 * 1024)


class _Stage:
    """One step of the layer pipeline on a thread of its own, fed through a
    bounded queue (so memory stays a few chunks). sha256, zlib and libzstd
    release the GIL on large buffers, so the stages run on separate CPUs.

    The first error is kept and raised by the next ``put`` or by ``close``;
    after it the thread only drains, so a producer never blocks on it."""

    _END = None

    def __init__(self, name: str, fn: Any, depth: int = 4) -> None:
        self._fn = fn
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._END:
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as e:  # raised in the producer's thread
                    self._error = e

    def put(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def close(self, *, abort: bool = False) -> None:
        """Wait until every chunk is through; its first error (unless aborting)."""
        if not self._closed:
            self._closed = True
            if abort and self._error is None:
                self._error = _Aborted()
            self._queue.put(self._END)
            self._thread.join()
        if self._error is not None and not abort:
            raise self._error


class _Aborted(Exception):
    """Marks a stage whose remaining chunks are to be dropped."""


class LayerBlobWriter:
    """The sink ``LayerTarWriter`` writes into: hashes the tar (diffID),
    compresses it and streams the result into a content store ingest.

    The three run as a pipeline (``_Stage``): the caller's thread only makes
    tar bytes, one thread hashes them, one compresses, one hashes and writes
    the blob. Small writes (tar headers) are gathered into ``BATCH`` bytes
    first, so a queue hand-off is never per entry. The bytes out are the same
    as from the serial chain: each stage sees the chunks in order."""

    BATCH = 256 * 1024

    def __init__(self, store: ContentStore, opts: CompressionOpts) -> None:
        _return_big_buffers()
        self.media_type = layer_media_type(opts)
        workers = os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gzip")
        try:
            self._comp = _compressor(opts, self._pool, workers)
        except BaseException:
            self._pool.shutdown()
            raise
        self._diff = hashlib.sha256()
        self._ingest: Ingest = store.ingest()
        self._pending = bytearray()
        # compressed pieces can be a whole zstd job (megabytes): keep few waiting
        self._blob = _Stage("layer-blob", self._write_blob, depth=2)
        self._compress = _Stage("layer-compress", self._compress_chunk)
        self._hash = _Stage("layer-diffid", self._diff.update)

    def _write_blob(self, data: bytes) -> None:
        # mapped here, on the stage's thread: the error reaches the caller through
        # the other stages, and must still name the content store
        with _store_errors():
            self._ingest.write(data)

    def _compress_chunk(self, data: bytes) -> None:
        out = self._comp.compress(data)
        if out:
            self._blob.put(out)

    def _dispatch(self, data: bytes) -> None:
        self._hash.put(data)
        self._compress.put(data)

    def write(self, data: bytes) -> int:
        n = len(data)
        if n < self.BATCH:
            self._pending += data
            if len(self._pending) >= self.BATCH:
                self._flush_pending()
        else:
            self._flush_pending()
            # the stages keep a reference: hand them an immutable copy only
            self._dispatch(data if type(data) is bytes else bytes(data))
        return n

    def _flush_pending(self) -> None:
        if self._pending:
            self._dispatch(bytes(self._pending))
            self._pending.clear()

    def finish(self) -> Layer:
        self._flush_pending()
        self._hash.close()
        self._compress.close()
        tail = self._comp.flush()
        with _store_errors():
            if tail:
                self._blob.put(tail)
            self._blob.close()
            self._pool.shutdown()
            size = self._ingest.size
            digest = self._ingest.commit()
        diff_id = Digest("sha256:" + self._diff.hexdigest())
        return Layer(Descriptor(self.media_type, digest, size), diff_id)

    def abort(self) -> None:
        for stage in (self._hash, self._compress, self._blob):
            stage.close(abort=True)
        self._pool.shutdown(cancel_futures=True)
        self._ingest.__exit__(None, None, None)


# --- xattrs -----------------------------------------------------------------------


def read_xattrs(path: str) -> dict[str, bytes]:
    """All xattrs of ``path`` (not following a final symlink), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in sorted(names):
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            # raced away, or a namespace we may list but not read
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue
            raise
    return out


def is_overlay_xattr(name: str, userxattr: bool = True) -> bool:
    """Overlayfs keeps its own bookkeeping in these; they never belong in a
    layer (and a layer must never plant them: the kernel would obey them)."""
    return name.startswith("trusted.overlay.") or (userxattr and name.startswith("user.overlay."))


# --- tar entry writer -------------------------------------------------------------


class LayerTarWriter:
    """Emits PAX tar entries for files on disk, whiteouts and opaque markers.

    Mtimes are truncated to whole seconds and uname/gname left empty, as
    moby and containerd do, so that a layer depends only on the tree.

    ``epoch`` (SOURCE_DATE_EPOCH) clamps every mtime to it, as BuildKit's
    ``rewrite-timestamp``: a file newer than the epoch gets the epoch, an older
    one keeps its time. No atime or ctime is ever written, so the mtime is the
    only time a layer carries and the tar bytes depend on nothing but the tree.
    """

    def __init__(
        self,
        out: LayerBlobWriter | IO[bytes],
        *,
        userxattr: bool = False,
        epoch: int | None = None,
    ) -> None:
        self._out = out
        self._userxattr = userxattr
        self._epoch = epoch
        # (st_dev, st_ino) of emitted multi-link files -> their name in the layer
        self._links: dict[tuple[int, int], str] = {}

    def add(self, rel: str, path: str, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
        """Emit ``path`` (already lstat'ed as ``st``) under the layer name ``rel``."""
        ti = tarfile.TarInfo(rel)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid = st.st_uid
        ti.gid = st.st_gid
        ti.uname = ti.gname = ""
        ti.mtime = clamp_mtime(st.st_mtime_ns // 1_000_000_000, self._epoch)
        ti.pax_headers = {
            XATTR_PAX_PREFIX + name: value.decode("utf-8", "surrogateescape")
            for name, value in xattrs.items()
            if not is_overlay_xattr(name, self._userxattr)
        }
        mode = st.st_mode
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            first = self._links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first
                self._write(ti)
                return
            if st.st_nlink > 1:
                self._links[key] = rel
            ti.type = tarfile.REGTYPE
            ti.size = st.st_size
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb", buffering=0) as f:
                self._write(ti, f)
            return
        if stat.S_ISDIR(mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor = os.major(st.st_rdev)
            ti.devminor = os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
        else:
            # sockets (and anything else) cannot be carried in a tar
            return
        self._write(ti)

    def add_whiteout(self, rel: str) -> None:
        parent, name = os.path.split(rel)
        self._marker(os.path.join(parent, WHITEOUT_PREFIX + name))

    def add_opaque(self, rel_dir: str) -> None:
        self._marker(os.path.join(rel_dir, WHITEOUT_OPAQUE))

    def close(self) -> None:
        # end of archive: two zero blocks (no record padding, as Go's writer)
        self._out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))

    def _marker(self, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.REGTYPE
        ti.mode = 0
        ti.mtime = 0
        ti.uname = ti.gname = ""
        self._write(ti)

    def _write(self, ti: tarfile.TarInfo, data: BinaryIO | None = None) -> None:
        # TarInfo.tobuf does the PAX encoding; the rest is blocks and padding.
        # (TarFile itself would keep every member in memory for nothing.)
        self._out.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if data is None or ti.size == 0:
            return
        remaining = ti.size
        while remaining:
            chunk = data.read(min(CHUNK, remaining))
            if not chunk:
                raise OSError(errno.EIO, f"{ti.name}: file shrank while it was read")
            self._out.write(chunk)
            remaining -= len(chunk)
        tail = ti.size % tarfile.BLOCKSIZE
        if tail:
            self._out.write(tarfile.NUL * (tarfile.BLOCKSIZE - tail))


def clamp_mtime(mtime: int, epoch: int | None) -> int:
    """``mtime`` no later than ``epoch`` (unchanged when there is none)."""
    return mtime if epoch is None else min(mtime, epoch)


def scan_sorted(path: str) -> list[tuple[str, os.stat_result]]:
    """Children of ``path`` with their lstat, in byte order of their names
    (the order Go's tar writers use, and parents always precede children)."""
    out: list[tuple[bytes, str, os.stat_result]] = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append((os.fsencode(entry.name), entry.name, st))
    out.sort(key=lambda t: t[0])
    return [(name, st) for _, name, st in out]


# --- read pipeline ----------------------------------------------------------------


class HashingReader:
    """Read-through sha256 and byte count over a binary stream."""

    def __init__(self, raw: IO[bytes] | Any) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._hash.hexdigest())


# --- decompression bombs --------------------------------------------------------
#
# containerd and BuildKit bound neither a layer's uncompressed size nor its ratio:
# a gzip layer of 10 MiB may hold 10 GiB of zeros and they write it all. We keep
# two bounds, both far from any real layer:
#
# * a ratio: past the first BOMB_FLOOR bytes, a layer may not decompress to more
#   than BOMB_RATIO times its compressed size. Deflate cannot exceed 1032:1, so no
#   gzip layer ever hits it (a gzip bomb is stopped by the disk reserve below);
#   zstd's RLE blocks reach 32768:1, and bytes that never reach the disk (the
#   stream after the tar's end, which we hash for the diffID) are bounded only
#   by this;
# * a disk reserve: extraction stops with "no space left on device" once the
#   snapshot's filesystem has less than min(5% of its size, 1 GiB) free, so a
#   bomb (or an honest layer too big for the disk) never takes the last blocks
#   other builds, the content store and the databases need.

BOMB_FLOOR = 1 << 30
BOMB_RATIO = 1100
RESERVE_FRACTION = 0.05
RESERVE_MAX = 1 << 30


class DecompressionBombError(UserError):
    """A layer decompresses to more than its ratio bound allows."""


class BoundedReader:
    """A reader that refuses to yield more than ``limit`` bytes in total."""

    def __init__(self, raw: Any, limit: int, what: str) -> None:
        self._raw = raw
        self._limit = limit
        self._what = what
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        # never ask for more than one byte past the limit: a -1 read of a bomb
        # would otherwise decompress it whole before we could count it
        want = self._limit + 1 - self.size
        data: bytes = self._raw.read(want if n < 0 else min(n, want))
        self.size += len(data)
        if self.size > self._limit:
            raise DecompressionBombError(
                f"{self._what} decompresses to more than {self._limit} bytes "
                f"(the bound is {BOMB_RATIO}x its compressed size past the first "
                f"{BOMB_FLOOR} bytes): refusing a decompression bomb"
            )
        return data


def bomb_limit(compressed_size: int) -> int:
    """How many uncompressed bytes a blob of ``compressed_size`` may yield."""
    return max(BOMB_FLOOR, BOMB_RATIO * compressed_size)


def disk_reserve(fd: int) -> int:
    """Bytes to leave free on the filesystem of ``fd``."""
    st = os.fstatvfs(fd)
    return min(int(st.f_blocks * st.f_frsize * RESERVE_FRACTION), RESERVE_MAX)


def check_reserve(fd: int, reserve: int, what: str) -> None:
    """Raise "no space left on device" when the filesystem of ``fd`` has less
    than ``reserve`` bytes (or 1% of its inodes) left."""
    st = os.fstatvfs(fd)
    low_inodes = st.f_files > 0 and st.f_favail < st.f_files // 100
    if st.f_bavail * st.f_frsize < reserve or low_inodes:
        raise HostError(
            f"{what}: no space left on device: extracting it would leave less than "
            f"{reserve} bytes (or 1% of the inodes) free on the snapshot's filesystem; "
            "stopped (a decompression bomb, or a layer too large for this disk)"
        )


#: the largest PAX or GNU long-name record a tar may carry. tarfile reads such a
#: record whole into memory, so a header claiming 1 GiB (a few KiB once
#: compressed) would cost 1 GiB; Go's archive/tar, which containerd and BuildKit
#: use, refuses records over 1 MiB (``maxSpecialFileSize``) and so do we.
MAX_SPECIAL_RECORD = 1 << 20

_SPECIAL_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class HeaderTooLargeError(UserError):
    """A tar's PAX or long-name record is larger than :data:`MAX_SPECIAL_RECORD`."""


class BoundedTarInfo(tarfile.TarInfo):
    """``tarfile.TarInfo`` that refuses an oversized PAX/long-name record before
    tarfile reads it into memory (pass it as ``tarfile.open(tarinfo=...)``)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _SPECIAL_TYPES and self.size > MAX_SPECIAL_RECORD:
            kind = "PAX header" if self.type not in _SPECIAL_TYPES[3:] else "GNU long name"
            raise HeaderTooLargeError(
                f"tar {kind} record of {self.size} bytes is larger than the "
                f"{MAX_SPECIAL_RECORD} bytes allowed (as Go's archive/tar)"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]

    # GNU sparse maps are read whole too: an old-format map chains 512-byte
    # extension blocks (a GiB of them, compressed to a MiB, would be 40 million
    # tuples), a 1.0-format map announces its length in its first line. Both are
    # tarfile's own code (CPython 3.11-3.13) with a bound of MAX_SPARSE_ENTRIES.

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        fileobj: Any = tarfile_.fileobj
        while isextended:
            buf = fileobj.read(tarfile.BLOCKSIZE)
            pos = 0
            for _ in range(21):
                try:
                    offset = tarfile.nti(buf[pos : pos + 12])  # type: ignore[attr-defined]
                    numbytes = tarfile.nti(buf[pos + 12 : pos + 24])  # type: ignore[attr-defined]
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
                pos += 24
            _check_sparse(len(structs), self.name)
            isextended = len(buf) > 504 and bool(buf[504])
        self.sparse = structs
        self.offset_data = fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_gnusparse_10(
        self, next_: tarfile.TarInfo, pax_headers: dict[str, str], tarfile_: tarfile.TarFile
    ) -> None:
        fileobj: Any = tarfile_.fileobj
        sparse: list[int] = []
        buf = fileobj.read(tarfile.BLOCKSIZE)
        head, buf = buf.split(b"\n", 1)
        fields = int(head)
        _check_sparse(fields, next_.name)
        while len(sparse) < fields * 2:
            if b"\n" not in buf:
                more = fileobj.read(tarfile.BLOCKSIZE)
                if not more:
                    raise tarfile.ReadError("truncated GNU sparse map")
                buf += more
            number, buf = buf.split(b"\n", 1)
            sparse.append(int(number))
        next_.offset_data = fileobj.tell()
        pairs: Any = list(zip(sparse[::2], sparse[1::2], strict=False))
        next_.sparse = pairs  # typeshed says bytes; tarfile stores (offset, size) pairs


#: entries of a GNU sparse map: as many as fit in MAX_SPECIAL_RECORD (24 bytes each)
MAX_SPARSE_ENTRIES = MAX_SPECIAL_RECORD // 24


def _check_sparse(n: int, name: str) -> None:
    if n > MAX_SPARSE_ENTRIES:
        raise HeaderTooLargeError(
            f"tar entry {name!r}: GNU sparse map of more than {MAX_SPARSE_ENTRIES} "
            "entries (a map larger than the 1048576 bytes a record may have)"
        )


def iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a stream-mode tar, without keeping them all.

    tarfile appends every member it reads to ``tar.members``, even in stream
    mode, so a layer of ten million empty entries (a few MiB compressed) would
    hold ten million TarInfo objects; here each is dropped once handled."""
    while (member := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]
        yield member


def decompressed(raw: Any, media_type: str) -> Any:
    """A reader of the uncompressed tar inside a layer blob of ``media_type``."""
    try:
        kind = layer_compression(media_type)
    except ValueError:
        raise UnsupportedError(f"unsupported layer media type {media_type!r}") from None
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


class ForwardReader:
    """``read``/``tell``/forward-only ``seek`` over a stream, for ``tarfile.TarFile``
    in its ordinary (seekable) mode.

    tarfile's stream mode (``r|``) keeps its buffer as one ``bytes`` and slices
    the rest off after every read: with a large buffer each 512-byte header read
    copies up to the whole buffer (about half the time of unpacking a layer of
    small files, measured in docs/performance.md). Here a read copies only what
    it returns. A backward seek, which tarfile never makes on a sequential walk,
    is refused rather than silently wrong.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._buf = b""
        self._off = 0
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self._pos:
            raise OSError(errno.ESPIPE, "layer stream cannot seek backwards")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, CHUNK)):
                break  # past the end: the next read says so
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._off :]]
            while chunk := self._raw.read(CHUNK):
                parts.append(chunk)
            self._buf, self._off = b"", 0
            out = b"".join(parts)
            self._pos += len(out)
            return out
        avail = len(self._buf) - self._off
        if n <= avail:
            out = self._buf[self._off : self._off + n]
            self._off += n
            self._pos += n
            return out
        parts = [self._buf[self._off :]] if avail else []
        need = n - avail
        self._buf, self._off = b"", 0
        while need > 0:
            chunk = self._raw.read(max(need, CHUNK))
            if not chunk:
                break
            if len(chunk) > need:
                parts.append(chunk[:need])
                self._buf, self._off = chunk, need
                need = 0
            else:
                parts.append(chunk)
                need -= len(chunk)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(out)
        return out


class DecompressingPipe:
    """The uncompressed tar of a layer blob, decompressed by a thread of its own
    while the caller extracts, so inflating (zlib and libzstd release the GIL)
    and hashing overlap with the file writes instead of taking turns.

    The thread hashes the blob as read (``blob_digest``, ``blob_size``) and the
    tar it yields (``digest``: the diffID, ``size``). At most ``depth`` chunks
    wait between the two threads, so memory stays bounded. A decompression
    error (or ``DecompressionBombError`` past ``limit`` uncompressed bytes) is
    raised by the ``read`` that reaches it, as the reader would have.
    Always ``close`` it (it stops and joins the thread) before closing ``raw``.
    """

    _DONE = object()

    def __init__(
        self,
        raw: IO[bytes] | Any,
        media_type: str,
        *,
        depth: int = 8,
        limit: int | None = None,
        what: str = "layer",
    ) -> None:
        _return_big_buffers()
        self._blob = HashingReader(raw)
        self._src = decompressed(self._blob, media_type)
        if limit is not None:
            # bytes past the tar's end are read (and hashed) here too: the bound
            # covers them, which is where a zstd bomb would put its bulk
            self._src = BoundedReader(self._src, limit, what)
        self._tar = hashlib.sha256()
        self.size = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._eof = False
        self._thread = threading.Thread(target=self._produce, name="decompress", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._src.read(CHUNK)
                if not chunk:
                    # bytes after the compressed stream still count in the blob digest
                    self._blob.drain()
                    break
                self._tar.update(chunk)
                self.size += len(chunk)
                self._put(chunk)
            self._put(self._DONE)
        except BaseException as e:  # handed to the reader, which raises it
            self._put(e)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        # one chunk per call whatever ``n``: ForwardReader does the gathering
        if self._eof:
            return b""
        item = self._queue.get()
        if item is self._DONE:
            self._eof = True
            return b""
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        assert isinstance(item, bytes)
        return item

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._tar.hexdigest())

    @property
    def blob_digest(self) -> Digest:
        return self._blob.digest

    @property
    def blob_size(self) -> int:
        return self._blob.size


#: errors a corrupt or truncated compressed stream raises from its reader
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error,
    gzip.BadGzipFile,
    EOFError,
    zstandard.ZstdError,
)


# --- mounts -----------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What a list of snapshot mounts means to a differ.

    ``layers`` are the read-only layer directories, nearest first (a bind's
    source is its only layer); ``upper`` is the writable upperdir of an
    active overlay snapshot.
    """

    kind: Literal["empty", "dir", "overlay"]
    layers: tuple[str, ...] = ()
    upper: str | None = None
    work: str | None = None
    options: tuple[str, ...] = ()
    #: how an overlay is mounted: the kernel's ``overlay`` or ``fuse-overlayfs``
    #: (whose upper dirs mark deletions its own way: only its mounts read them)
    fstype: str = "overlay"

    @property
    def userxattr(self) -> bool:
        return "userxattr" in self.options

    def all_dirs(self) -> tuple[str, ...]:
        """Every layer directory, nearest first (the upperdir counts as one)."""
        return ((self.upper,) if self.upper else ()) + self.layers


def parse_mounts(mounts: Sequence[Mount]) -> View:
    if not mounts:
        return View("empty")
    if len(mounts) != 1:
        raise UnsupportedError(f"differ supports one mount per snapshot, got {len(mounts)}")
    m = mounts[0]
    if is_bind(m):
        return View("dir", layers=(m.source,), options=m.options)
    if m.type in ("overlay", FUSE_OVERLAY):
        lower = m.option("lowerdir")
        layers = tuple(d for d in (lower or "").split(":") if d)
        if not layers:
            raise UnsupportedError(f"overlay mount without lowerdir: {m.options}")
        return View(
            "overlay",
            layers=layers,
            upper=m.option("upperdir"),
            work=m.option("workdir"),
            options=m.options,
            fstype=m.type,
        )
    raise UnsupportedError(f"differ cannot read a {m.type!r} mount")


_OVERLAY_OWN_OPTIONS = ("lowerdir=", "upperdir=", "workdir=")


@contextlib.contextmanager
def mounted(view: View, scratch: str, *, writable: bool = False) -> Iterator[str]:
    """A directory showing the merged tree of ``view``; unmounted on exit.

    Binds are read in place. Read-only overlay views stack the upperdir as
    the top lowerdir (as containerd's read-only temp mounts do), so reading
    never touches the snapshot's workdir; a single layer gets an empty
    bottom layer because the kernel wants two lowerdirs without an upper.
    """
    if view.kind == "empty":
        d = tempfile.mkdtemp(prefix="empty-", dir=scratch)
        try:
            yield d
        finally:
            os.rmdir(d)
        return
    if view.kind == "dir":
        yield view.layers[0]
        return
    extra: list[str] = []
    try:
        keep = [o for o in view.options if not o.startswith(_OVERLAY_OWN_OPTIONS)]
        keep = [o for o in keep if o not in ("ro", "rw")]
        if writable:
            if not view.upper or not view.work:
                raise UnsupportedError("cannot write into a read-only overlay view")
            opts = [
                "lowerdir=" + ":".join(view.layers),
                f"upperdir={view.upper}",
                f"workdir={view.work}",
            ]
        else:
            dirs = list(view.all_dirs())
            if len(dirs) < 2:
                bottom = tempfile.mkdtemp(prefix="bottom-", dir=scratch)
                extra.append(bottom)
                dirs.append(bottom)
            opts = ["ro", "lowerdir=" + ":".join(dirs)]
        # fs.mount handles option strings longer than a page (deep chains)
        merged = Mount(view.fstype, "overlay", tuple(opts + keep))
        with temp_mounted([merged], Path(scratch)) as t:
            yield os.fspath(t)
    finally:
        for d in extra:
            with contextlib.suppress(OSError):
                os.rmdir(d)


def remove_scratch(scratch: str) -> None:
    """Remove a scratch dir made for temporary mounts, skipping (and so
    keeping) anything that is still mounted."""
    with os.scandir(scratch) as it:
        for entry in it:
            if not os.path.ismount(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(scratch)


def map_os_error(what: str, e: OSError) -> Exception:
    """The host's fault (disk full, I/O) vs the layer's (a path that cannot exist),
    in the words users read (``no space left on device: /x``, not ``[Errno 28]``)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM):
        return HostError(f"{what}: {os_error_text(e)}")
    return UserError(f"{what}: {os_error_text(e)}")


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    # A layer is written while its snapshot is read: without this, a full disk
    # under the content store surfaced as "cannot read snapshot" (issue 18).
    try:
        yield
    except OSError as e:
        raise map_os_error("cannot write the layer into the content store", e) from e
