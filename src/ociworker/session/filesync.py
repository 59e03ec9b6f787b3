"""Incremental sync of a local build context from a client to the worker.

The engine is transport-agnostic: the daemon's session stream carries what it
produces and consumes. One sync goes:

1. client: ``scan`` lists the context (``.dockerignore`` applied exactly as a
   local COPY applies it, symlinks listed as symlinks, never followed);
2. worker: ``ContextStore.begin(key, stats)`` validates every name, locks the
   key and answers ``Transfer.wanted``: the regular files whose size, mtime or
   mode differ from the last successful sync of that key (mtime-only changes
   are re-sent, as buildx does: an edit that keeps the size is only visible in
   the mtime, and neither side hashes content);
3. client: ``read_chunks`` for each wanted file; worker: ``Transfer.write``;
4. worker: ``Transfer.finish()`` makes the key's dir match the list exactly
   and returns it; it stays unchanged until the Transfer is closed.

The worker trusts nothing from the client. Names must be clean and relative;
every entry's parent must be a directory of the same list, so nothing can be
placed "through" a symlink; all writes into the synced tree go through
directory descriptors opened with ``O_NOFOLLOW``, so a symlink the client sent
(``/etc``, ``../../..``) is created as a link and never written through.
Content arrives in a staging dir next to the tree and is only renamed into the
tree by ``finish``: an aborted transfer leaves the previous copy untouched; a
``finish`` that fails half-way has already deleted the metadata file, so the
next sync of the key re-sends everything ("dirty").

Layout under the store root (``<state>/contexts``), ``H = sha256(key)``, so a
key never becomes a file name::

    H/            the synced tree (the build's context root)
    H.json        stats of the last successful sync, written atomically
    H.lock        flock(2) held while a Transfer is open
    H.incoming/   staging for the content of the open Transfer

Concurrency: ``begin`` *blocks its thread* in ``flock`` until the key is free,
so from a coroutine use ``abegin`` (runs it in a thread and releases a lock
that arrives after the waiter was cancelled) or ``try_begin`` (None when busy;
BuildKit instead falls back to a fresh copy, which a caller can do by trying a
second key). Two Transfers of one key serialize across threads and
processes; different keys never wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import stat
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ociworker.errors import HostError, UnsafePathError, UserError
from ociworker.fs.atomic import fsync_dir
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.fs.oserror import os_error_text
from ociworker.fs.paths import secure_join
from ociworker.fs.walk import Source, walk_selected

__all__ = ["ContextStore", "FileStat", "Transfer", "read_chunks", "scan"]

_NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX)
_PATH_MAX = 4095  # bytes in a path or a symlink target, without the NUL
_INT64 = 1 << 63
_ID_MAX = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to chown(2)
_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)
_META_VERSION = 1

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- the entry ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileStat:
    """One context entry as the client reports it.

    ``path`` is clean, relative and "/"-separated (never "", "." or with
    ".."); ``mode`` is the full st_mode; ``size`` counts for regular files
    only (0 for others); ``linkname`` is a symlink's target, sent as is.
    """

    path: str
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    linkname: str = ""

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "mode": self.mode,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "uid": self.uid,
            "gid": self.gid,
        }
        if self.linkname:
            out["linkname"] = self.linkname
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FileStat:
        """Parse an entry; a missing or mistyped field is the sender's error."""
        if not isinstance(d, Mapping):
            raise UserError(f"invalid context entry: expected an object, got {type(d).__name__}")
        path = d.get("path")
        if not isinstance(path, str):
            raise UserError(f"invalid context entry: 'path' must be a string, got {path!r}")
        ints: dict[str, int] = {}
        for field in ("mode", "size", "mtime_ns", "uid", "gid"):
            value = d.get(field)
            # bool is an int subclass; a JSON true is not a number
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(
                    f"invalid context entry {path!r}: {field!r} must be an integer, got {value!r}"
                )
            ints[field] = value
        linkname = d.get("linkname", "")
        if not isinstance(linkname, str):
            raise UserError(f"invalid context entry {path!r}: 'linkname' must be a string")
        return cls(path=path, linkname=linkname, **ints)


def _check_name(name: str) -> str:
    """``name`` if it is a clean relative path; UnsafePathError naming it otherwise."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"context entry {name!r}: empty name")
    if "\x00" in name:
        raise UnsafePathError(f"context entry {name!r}: NUL in name")
    if name.startswith("/"):
        raise UnsafePathError(f"context entry {name!r}: absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafePathError(f"context entry {name!r}: '..' would leave the context")
    if posixpath.normpath(name) != name or name == ".":
        raise UnsafePathError(f"context entry {name!r}: not a clean path")
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:
        raise UnsafePathError(f"context entry {name!r}: cannot be encoded as a file name") from None
    if len(raw) > _PATH_MAX or any(len(os.fsencode(p)) > _NAME_MAX for p in parts):
        raise UnsafePathError(f"context entry {name!r}: name too long")
    return name


def _check_entry(st: FileStat) -> None:
    _check_name(st.path)
    where = f"context entry {st.path!r}"
    # before S_IFMT, which raises OverflowError outside an unsigned int
    if not 0 <= st.mode <= 0o177777:
        raise UserError(f"{where}: invalid mode {st.mode}")
    if st.kind not in _TYPES:
        raise UserError(f"{where}: mode {st.mode:o} is not a file, directory or symlink")
    if st.mode & ~(stat.S_IFMT(st.mode) | 0o7777):
        raise UserError(f"{where}: invalid mode {st.mode:o}")
    if not 0 <= st.size < _INT64:
        raise UserError(f"{where}: invalid size {st.size}")
    if not -_INT64 <= st.mtime_ns < _INT64:
        raise UserError(f"{where}: invalid mtime {st.mtime_ns}")
    if not (0 <= st.uid <= _ID_MAX and 0 <= st.gid <= _ID_MAX):
        raise UserError(f"{where}: invalid owner {st.uid}:{st.gid}")
    if st.kind == stat.S_IFLNK:
        if not st.linkname or "\x00" in st.linkname:
            raise UserError(f"{where}: a symlink needs a target without NUL")
        try:
            if len(os.fsencode(st.linkname)) > _PATH_MAX:
                raise UserError(f"{where}: symlink target too long")
        except UnicodeEncodeError:
            raise UserError(f"{where}: symlink target cannot be encoded") from None
    elif st.linkname:
        raise UserError(f"{where}: only a symlink has a target")


def _validate(stats: Sequence[FileStat]) -> dict[str, FileStat]:
    """The list as path -> entry, sorted by path, or the first reason to refuse it."""
    entries: dict[str, FileStat] = {}
    for st in stats:
        if not isinstance(st, FileStat):
            raise UserError(f"invalid context entry {st!r}")
        _check_entry(st)
        if st.path in entries:
            raise UnsafePathError(f"context entry {st.path!r}: listed twice")
        entries[st.path] = st
    for path in entries:
        parent = posixpath.dirname(path)
        if not parent:
            continue
        up = entries.get(parent)
        if up is None:
            raise UnsafePathError(f"context entry {path!r}: its directory {parent!r} is not listed")
        if up.kind == stat.S_IFLNK:
            raise UnsafePathError(f"context entry {path!r}: {parent!r} is a symlink")
        if up.kind != stat.S_IFDIR:
            raise UnsafePathError(f"context entry {path!r}: {parent!r} is not a directory")
    return {p: entries[p] for p in sorted(entries)}


# --- client side -------------------------------------------------------------------


def scan(root: Path, ignore: IgnoreMatcher | None = None) -> list[FileStat]:
    """The entries of the context ``root`` a sync sends, sorted by path.

    The walk is the one COPY uses on a local context (``fs.walk.walk_selected``),
    so ``.dockerignore`` and its ``!exceptions`` select exactly the same files;
    an excluded directory that holds a re-included file is listed itself (with
    its own metadata), as fsutil does, since the worker needs every parent.
    Devices, fifos and sockets are skipped, as buildx does.
    """
    src = Source(Path(root), ignore, is_context=True)
    top = os.fspath(root)
    found: dict[str, FileStat] = {}
    for rel, st in walk_selected(src, "", follow=True):
        if rel and stat.S_IFMT(st.st_mode) in _TYPES:
            found[rel] = _stat_of(top, rel, st)
    for rel in list(found):
        parent = posixpath.dirname(rel)
        while parent and parent not in found:
            # the walker only descends into real directories, so no link is on the way
            found[parent] = _stat_of(top, parent, os.lstat(os.path.join(top, parent)))
            parent = posixpath.dirname(parent)
    return [found[p] for p in sorted(found)]


def _stat_of(top: str, rel: str, st: os.stat_result) -> FileStat:
    is_link = stat.S_ISLNK(st.st_mode)
    return FileStat(
        path=rel,
        mode=st.st_mode,
        size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
        mtime_ns=st.st_mtime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
        linkname=os.readlink(os.path.join(top, rel)) if is_link else "",
    )


def read_chunks(
    root: Path, path: str, chunk: int = 1 << 20, *, size: int | None = None
) -> Iterator[bytes]:
    """The content of the regular file ``path`` under ``root``, in chunks.

    Refuses a symlink (at the end or on the way) and anything not a regular
    file. With ``size`` (what ``scan`` announced), a file that grew or shrank
    since is an error instead of a short or long send. Nothing happens before
    the first ``next()`` (errors surface there); the file is closed when the
    iterator ends or is closed, so an abandoned iterator holds no descriptor.
    """
    name = _check_name(path)
    full = secure_join(root, name, follow_last=False)
    if full != Path(root, name):
        raise UnsafePathError(f"{path!r}: a symlink is on the way")
    try:
        # O_NONBLOCK: a fifo put there since the scan must not hang the open
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path!r} is a symlink") from None
        if e.errno == errno.ENOENT:
            raise UserError(f"{path!r} was removed from the context during the sync") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path!r} is not a regular file")
    with os.fdopen(fd, "rb", buffering=0) as f:
        left = size
        while left is None or left > 0:
            data = f.read(chunk if left is None else min(chunk, left))
            if not data:
                if left:
                    raise UserError(f"{path!r} shrank while the context was being sent")
                return
            if left is not None:
                left -= len(data)
            yield data
        if f.read(1):
            raise UserError(f"{path!r} grew while the context was being sent")


# --- worker side -------------------------------------------------------------------


def _host_error(what: str, e: OSError) -> HostError:
    # Every client-made cause (names, types, sizes) is refused before the disk
    # is touched, so what fails afterwards is the host's: disk full, I/O, EACCES.
    return HostError(f"context sync: {what}: {os_error_text(e)}")


@dataclass(frozen=True)
class KeyPaths:
    """Where a key's tree, record, lock and staging dir live (all named by its digest)."""

    tree: Path
    meta: Path
    lock: Path
    staging: Path


class ContextStore:
    """The last synced copy of each client context, by session key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # contexts may hold private files: only the worker reads the store
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def paths(self, key: str) -> KeyPaths:
        name = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return KeyPaths(
            tree=self.root / name,
            meta=self.root / f"{name}.json",
            lock=self.root / f"{name}.lock",
            staging=self.root / f"{name}.incoming",
        )

    def begin(self, key: str, stats: Sequence[FileStat]) -> Transfer:
        """Validate ``stats``, wait for the key's lock (blocking this thread) and
        plan the transfer. A refused list changes nothing on disk."""
        t = self._begin(key, stats, blocking=True)
        assert t is not None
        return t

    def try_begin(self, key: str, stats: Sequence[FileStat]) -> Transfer | None:
        """``begin``, or None at once when another Transfer holds the key."""
        return self._begin(key, stats, blocking=False)

    async def abegin(
        self, key: str, stats: Sequence[FileStat], *, spare_copies: int = 0
    ) -> Transfer:
        """``begin`` for coroutines: waits in a thread, never blocking the loop.

        With ``spare_copies``, a busy key is not waited for while one of that
        many spare copies of it is free (BuildKit gives a second build of a busy
        context a fresh copy too): concurrent syncs of one context then do not
        queue behind each other's builds. Only when all are busy does it wait
        for the key itself.

        If the waiting coroutine is cancelled, the thread still gets the lock
        eventually; it is then released at once instead of leaking.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Transfer] = loop.create_future()

        def wait() -> None:
            try:
                t = self._begin_any(key, stats, spare_copies)
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):  # the loop is gone
                    loop.call_soon_threadsafe(_settle, fut, None, exc)
                return
            try:
                loop.call_soon_threadsafe(_settle, fut, t, None)
            except RuntimeError:  # the loop is gone: nobody will take the key
                t.close()

        # A thread of its own, not the loop's executor: the wait may last as long
        # as another build holds the key, and builds queued on one context (more
        # than its spare copies) took every executor thread, so the holders could
        # never finish the to_thread calls that release it (issue 18, found with
        # 32 concurrent builds of 16 sharing one context).
        threading.Thread(target=wait, name="ociworker-context-lock", daemon=True).start()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_abandoned)
            raise

    def _begin_any(self, key: str, stats: Sequence[FileStat], spare_copies: int) -> Transfer:
        entries = _validate(stats)
        for n in range(1 + spare_copies):
            t = self._lock(key if n == 0 else f"{key}\x00copy{n}", entries, blocking=False)
            if t is not None:
                return t
        t = self._lock(key, entries, blocking=True)
        assert t is not None
        return t

    def _begin(self, key: str, stats: Sequence[FileStat], *, blocking: bool) -> Transfer | None:
        return self._lock(key, _validate(stats), blocking=blocking)

    def _lock(self, key: str, entries: dict[str, FileStat], *, blocking: bool) -> Transfer | None:
        paths = self.paths(key)
        try:
            lock_fd = os.open(
                paths.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise _host_error("lock", e) from e
        try:
            # flock locks belong to the open file description, so two begin()
            # in one process (two threads) exclude each other like two processes
            fcntl.flock(lock_fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None
        except BaseException:
            os.close(lock_fd)
            raise
        return Transfer(paths, entries, lock_fd)  # owns lock_fd from here, even on error


def _settle(fut: asyncio.Future[Transfer], t: Transfer | None, exc: BaseException | None) -> None:
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert t is not None
        fut.set_result(t)


def _close_abandoned(fut: asyncio.Future[Transfer]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def _load_meta(path: Path) -> dict[str, FileStat]:
    """The stats of the last successful sync; {} when absent, dirty or unreadable."""
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("version") != _META_VERSION:
            return {}
        return {e.path: e for e in (FileStat.from_json(d) for d in doc["entries"])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UserError):
        return {}


class Transfer:
    """One sync of one key: which files to send, their content, then ``finish``.

    Use as a context manager (or call ``close``): closing releases the key and
    drops content not yet applied. Keep it open while a build reads the dir
    ``finish`` returned: the lock is what keeps another sync from changing it.
    Not thread-safe: one caller drives a Transfer, one call at a time.
    """

    def __init__(self, paths: KeyPaths, entries: dict[str, FileStat], lock_fd: int) -> None:
        self._paths = paths
        self._entries = entries
        self._lock_fd: int | None = lock_fd
        self._privileged = os.geteuid() == 0
        self._stage_fd: int | None = None
        self._cur: tuple[str, int] | None = None
        self._finished = False
        self.bytes_received = 0
        #: files whose content must be sent, sorted by path
        self.wanted: list[str] = []
        self._old: dict[str, FileStat] = {}
        self._slot: dict[str, str] = {}  # wanted path -> its file name in staging
        self._got: dict[str, int] = {}  # wanted path -> bytes received
        try:
            self._plan()
        except OSError as e:
            self._release()
            raise _host_error("prepare", e) from e
        except BaseException:
            self._release()
            raise

    def _plan(self) -> None:
        paths = self._paths
        self._old = _load_meta(paths.meta)
        # leftovers of a crashed transfer: we hold the lock, nobody else uses them
        shutil.rmtree(paths.staging, ignore_errors=True)
        os.mkdir(paths.staging, 0o700)
        self._stage_fd = os.open(paths.staging, _DIR_PATH)
        if paths.tree.is_symlink() or not paths.tree.is_dir():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.tree)
            os.mkdir(paths.tree, 0o755)
            self._old = {}
        self.wanted = [
            p for p, st in self._entries.items() if st.kind == stat.S_IFREG and self._changed(st)
        ]
        self._slot = {p: f"{i:08d}" for i, p in enumerate(self.wanted)}
        self._got = dict.fromkeys(self.wanted, 0)

    def _changed(self, st: FileStat) -> bool:
        old = self._old.get(st.path)
        if old is None or (old.mode, old.size, old.mtime_ns) != (st.mode, st.size, st.mtime_ns):
            return True
        # the record says it is there; make sure the disk agrees
        try:
            disk = os.lstat(self._paths.tree / st.path)
        except OSError:
            return True
        return not stat.S_ISREG(disk.st_mode) or disk.st_size != st.size

    # --- receiving -----------------------------------------------------------------

    def write(self, path: str, data: bytes) -> None:
        """Append a chunk of ``path``'s content; chunks of one file come in order."""
        if self._lock_fd is None or self._finished or self._stage_fd is None:
            raise UserError("context sync: the transfer is already closed")
        got = self._got.get(path)
        if got is None:
            raise UserError(f"context sync: {path!r} was not asked for")
        size = self._entries[path].size
        if got + len(data) > size:
            raise UserError(
                f"context sync: {path!r} sent more than the {size} bytes its entry announced"
            )
        try:
            fd = self._open_slot(path)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            raise _host_error(f"receive {path!r}", e) from e
        self._got[path] = got + len(data)
        self.bytes_received += len(data)

    def _open_slot(self, path: str) -> int:
        if self._cur is not None and self._cur[0] == path:
            return self._cur[1]
        self._close_slot()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._slot[path], flags, 0o600, dir_fd=self._stage_fd)
        self._cur = (path, fd)
        return fd

    def _close_slot(self) -> None:
        if self._cur is not None:
            os.close(self._cur[1])
            self._cur = None

    # --- applying ------------------------------------------------------------------

    def finish(self) -> Path:
        """Make the key's dir match the list; the dir, unchanged until ``close``."""
        if self._lock_fd is None or self._finished:
            raise UserError("context sync: the transfer is already closed")
        self._close_slot()
        short = [p for p in self.wanted if self._got[p] != self._entries[p].size]
        if short:
            p = short[0]
            raise UserError(
                f"context sync incomplete: {len(short)} file(s) not fully sent, "
                f"first {p!r} ({self._got[p]} of {self._entries[p].size} bytes)"
            )
        try:
            # From here on the tree changes: without a record, a failure below
            # makes the next sync of this key re-send everything.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._paths.meta)
            fsync_dir(self._paths.meta.parent)
            self._apply()
            self._write_meta()
        except OSError as e:
            raise _host_error("apply", e) from e
        self._finished = True
        return self._paths.tree

    def _apply(self) -> None:
        tree_fd = os.open(self._paths.tree, _DIR_READ)
        try:
            self._prune(tree_fd, "")
            with _DirFds(tree_fd) as dirs:
                for path, st in self._entries.items():  # sorted: parents first
                    parent, base = posixpath.split(path)
                    self._place(dirs.open(parent), base, st)
                # directory modes and times last, children before parents, so a
                # read-only dir still took its children and keeps its mtime
                for path, st in reversed(self._entries.items()):
                    if st.kind == stat.S_IFDIR:
                        parent, base = posixpath.split(path)
                        self._dir_meta(dirs.open(parent), base, st)
        finally:
            os.close(tree_fd)

    def _prune(self, dir_fd: int, prefix: str) -> None:
        """Remove what the list does not have, or has with another type or target."""
        with os.scandir(dir_fd) as it:
            names = [e.name for e in it]
        for name in names:
            rel = f"{prefix}/{name}" if prefix else name
            disk = os.lstat(name, dir_fd=dir_fd)
            want = self._entries.get(rel)
            keep = want is not None and want.kind == stat.S_IFMT(disk.st_mode)
            if keep and want is not None and want.kind == stat.S_IFLNK:
                keep = os.readlink(name, dir_fd=dir_fd) == want.linkname
            if not keep:
                if stat.S_ISDIR(disk.st_mode):
                    if not self._privileged:
                        _make_writable(dir_fd, name)
                    shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a link
                else:
                    os.unlink(name, dir_fd=dir_fd)
            elif stat.S_ISDIR(disk.st_mode):
                if not self._privileged and disk.st_mode & 0o700 != 0o700:
                    # its final mode comes back in the last pass
                    os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
                sub = os.open(name, _DIR_READ, dir_fd=dir_fd)
                try:
                    self._prune(sub, rel)
                finally:
                    os.close(sub)

    def _place(self, pfd: int, base: str, st: FileStat) -> None:
        if st.kind == stat.S_IFDIR:
            with contextlib.suppress(FileExistsError):  # kept by _prune: a real dir
                os.mkdir(base, 0o700, dir_fd=pfd)
        elif st.kind == stat.S_IFLNK:
            with contextlib.suppress(FileExistsError):  # kept by _prune: same target
                os.symlink(st.linkname, base, dir_fd=pfd)
            if self._privileged:
                os.chown(base, st.uid, st.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(base, ns=(st.mtime_ns, st.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        elif st.path in self._slot:
            slot = self._slot[st.path]
            fd = os.open(
                slot,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._stage_fd,
            )
            try:
                os.fsync(fd)  # the record written after this must not outlive the data
                self._file_meta(fd, st)
            finally:
                os.close(fd)
            # rename replaces a file atomically; _prune removed a dir in the way
            os.rename(slot, base, src_dir_fd=self._stage_fd, dst_dir_fd=pfd)
        else:
            old = self._old[st.path]
            if self._privileged and (old.uid, old.gid) != (st.uid, st.gid):
                fd = os.open(
                    base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=pfd
                )
                try:
                    self._file_meta(fd, st)
                finally:
                    os.close(fd)

    def _file_meta(self, fd: int, st: FileStat) -> None:
        if self._privileged:
            os.fchown(fd, st.uid, st.gid)
        os.fchmod(fd, stat.S_IMODE(st.mode))  # after chown, which clears set-id bits
        os.utime(fd, ns=(st.mtime_ns, st.mtime_ns))

    def _dir_meta(self, pfd: int, base: str, st: FileStat) -> None:
        if self._privileged:
            os.chown(base, st.uid, st.gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(base, stat.S_IMODE(st.mode), dir_fd=pfd, follow_symlinks=False)
        os.utime(base, ns=(st.mtime_ns, st.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _write_meta(self) -> None:
        doc = {"version": _META_VERSION, "entries": [e.to_json() for e in self._entries.values()]}
        tmp = self._paths.meta.with_name(self._paths.meta.name + ".tmp")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self._paths.meta)
        fsync_dir(self._paths.meta.parent)

    # --- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Release the key; content not applied by ``finish`` is dropped."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self._close_slot()
        shutil.rmtree(self._paths.staging, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._stage_fd is not None:
            os.close(self._stage_fd)
            self._stage_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            warnings.warn(
                f"context transfer of {self._paths.tree.name} was never closed",
                ResourceWarning,
                stacklevel=1,
            )
            self.close()


class _DirFds:
    """Directory descriptors below the tree, opened one ``O_NOFOLLOW`` component
    at a time and kept as a stack along the current path (entries come sorted,
    so siblings reuse their parent's descriptor)."""

    def __init__(self, tree_fd: int) -> None:
        self._stack: list[tuple[str, int]] = [("", tree_fd)]

    def open(self, rel: str) -> int:
        while len(self._stack) > 1 and not _is_within(rel, self._stack[-1][0]):
            os.close(self._stack.pop()[1])
        top, fd = self._stack[-1]
        rest = rel[len(top) :].lstrip("/") if top else rel
        for part in rest.split("/") if rest else ():
            fd = os.open(part, _DIR_PATH, dir_fd=fd)
            top = f"{top}/{part}" if top else part
            self._stack.append((top, fd))
        return fd

    def __enter__(self) -> _DirFds:
        return self

    def __exit__(self, *exc: object) -> None:
        while len(self._stack) > 1:
            os.close(self._stack.pop()[1])


def _is_within(rel: str, ancestor: str) -> bool:
    return rel == ancestor or rel.startswith(ancestor + "/")


def _make_writable(dir_fd: int, name: str) -> None:
    """u+rwx on a directory tree (not following links), so a non-root worker
    can empty a read-only dir it synced before."""
    os.chmod(name, 0o700, dir_fd=dir_fd, follow_symlinks=False)
    sub = os.open(name, _DIR_READ, dir_fd=dir_fd)
    try:
        with os.scandir(sub) as it:
            subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        for child in subdirs:
            _make_writable(sub, child)
    finally:
        os.close(sub)
