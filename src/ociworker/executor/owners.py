"""Which worker process owns a runtime resource, and whether it is still alive.

Why: embedded builds (``ociworker build`` without ``--addr``) are many
processes on one root, often at the same time, and any of them may be killed
with SIGKILL. Only the daemon used to recover at start, and it swept the whole
state dir, which would also kill a live embedded build's steps. So every worker
process is an *owner*: it takes a random 8-hex id, puts that id into the name
of everything it creates (container ids and bundles ``ociw-<id>-...``, step
cgroups, the bridge ``ociw<id>``, veths, nft tables ``ociworker_<id>``, its
scratch dir), and holds an exclusive ``flock`` on ``<owners>/<id>.lock`` (its
pid inside) for as long as it lives. The kernel drops the lock when the process
dies, however it dies. A worker starting later takes the lock of each owner it
can (non-blocking): those are dead, and exactly their resources are removed,
then their lock file; a lock it cannot take is a live owner's, left alone.
Two workers recovering at once are kept apart by the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from ociworker.log import get_logger

_log = get_logger("ociworker.recovery")

_SUFFIX = ".lock"


class Owner:
    """This process's claim on ``<owners_dir>/<ident>.lock``; ``release`` ends it."""

    def __init__(self, owners_dir: Path, ident: str, fd: int) -> None:
        self.dir = owners_dir
        self.ident = ident
        self._fd: int | None = fd

    @classmethod
    def claim(cls, owners_dir: Path) -> Owner:
        owners_dir.mkdir(parents=True, exist_ok=True)
        while True:
            ident = secrets.token_hex(4)
            path = owners_dir / f"{ident}{_SUFFIX}"
            try:
                # O_CLOEXEC: a runtime or container that outlives us must not
                # inherit the lock, or we would look alive for as long as it runs.
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Between create and flock a recovering worker may have taken the
            # unlocked file for a dead owner's and removed it: then try again.
            if _same_file(fd, path):
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(owners_dir, ident, fd)
            os.close(fd)

    def release(self, *, left_behind: bool = False) -> None:
        """Drop the claim once everything named after it is gone (idempotent).
        ``left_behind``: something could not be removed; the lock goes but the
        file stays, so the next worker to start takes it for a dead owner's
        and removes what is left."""
        if self._fd is None:
            return
        if not left_behind:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / f"{self.ident}{_SUFFIX}").unlink()
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def live_owners(owners_dir: Path) -> list[str]:
    """Ids whose lock someone holds right now (this process's own included)."""
    out = []
    for path in sorted(owners_dir.glob(f"*{_SUFFIX}")) if owners_dir.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out.append(path.name.removesuffix(_SUFFIX))
        finally:
            os.close(fd)  # a lock we took is dropped with it
    return out


def recover_dead(owners_dir: Path, cleanup: Callable[[str], None]) -> list[str]:
    """Call ``cleanup(ident)`` for every dead owner of ``owners_dir``, then remove
    its lock file; the ids recovered. A cleanup that fails keeps the lock file,
    so the next start tries again (cleanups are idempotent)."""
    done = []
    for path in sorted(owners_dir.glob(f"*{_SUFFIX}")) if owners_dir.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # another worker recovered it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive, or being recovered by another worker
            if not _same_file(fd, path):
                continue  # recovered and removed between our open and our lock
            ident = path.name.removesuffix(_SUFFIX)
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            try:
                cleanup(ident)
            except Exception as exc:
                _log.warning("could not recover a dead worker", owner=ident, pid=pid, error=exc)
                continue
            path.unlink()
            _log.info("recovered what a dead worker left", owner=ident, pid=pid)
            done.append(ident)
        finally:
            os.close(fd)
    return done
