"""The base of the directory snapshotters (native, overlay): the metadata store
and the tree of each snapshot.

Layout under ``root`` (nothing is written anywhere else)::

    metadata.db          SQLite, WAL: one row per key/name, parent by row id
    snapshots/<id>/fs    the snapshot's own tree (overlay: its upperdir)
    snapshots/<id>/...   implementation extras (overlay: work, flat)
    tmp/                 mount points and scratch of the snapshotter itself

Keys and names are arbitrary caller strings, so they only ever live in the
database; directories are named by the row id, which AUTOINCREMENT never
reuses, so a directory can never be mistaken for another snapshot's.

Concurrency: every operation opens its own connection and changes metadata in
one ``BEGIN IMMEDIATE`` transaction, so two processes (or two snapshotter
objects) on one root serialise through SQLite's lock: a name is committed
once, and a parent cannot lose its last child check to a concurrent prepare.
Directories are created after their row exists and deleted after their row is
gone, so a directory without a row is always garbage (swept on first use).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ociworker.core.mounts import Mount
from ociworker.errors import HostError, NotFoundError, UserError
from ociworker.fs.mount import mountpoints_under
from ociworker.fs.sqlite import enable_wal
from ociworker.fs.tree import disk_usage, rmtree
from ociworker.snapshot import access
from ociworker.snapshot.base import Kind, SnapshotInfo

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent INTEGER REFERENCES snapshots(id)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
-- the worker process (owner id, ``executor.owners``) using an active or view
-- snapshot: what a process killed with SIGKILL left is found by its id
CREATE TABLE IF NOT EXISTS owners (
    id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
    owner TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS owners_owner ON owners(owner);
"""

# Committed ancestors of a row, nearest first (the row itself included).
_CHAIN = """
WITH RECURSIVE chain(id, key, kind, parent, n) AS (
    SELECT id, key, kind, parent, 0 FROM snapshots WHERE id = ?
    UNION ALL
    SELECT s.id, s.key, s.kind, s.parent, chain.n + 1
    FROM snapshots s JOIN chain ON s.id = chain.parent
)
SELECT id, key, kind, parent FROM chain ORDER BY n
"""


@dataclass(frozen=True)
class Row:
    id: int
    key: str
    kind: Kind
    parent: int | None


def _row(t: Any) -> Row:
    return Row(int(t[0]), str(t[1]), cast(Kind, t[2]), None if t[3] is None else int(t[3]))


class DirSnapshotter:
    """Snapshots as directories under ``root``; subclasses decide trees and mounts."""

    #: which snapshotter ``open_snapshotter`` picked and why ("overlayfs: auto, ...")
    picked: str = ""
    #: the worker process's owner id, recorded with each active and view
    #: snapshot it makes (``drop_owned``); None: not recorded
    owner: str | None = None

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.snapshots_dir = self.root / "snapshots"
        self.tmp_dir = self.root / "tmp"
        self._db_path = self.root / "metadata.db"
        self._init_lock = threading.Lock()
        self._ready = False
        # One connection for the process, taken in turn (every statement is short).
        # A connection per operation cost a WAL checkpoint, with its fsyncs, each time
        # the last one closed: milliseconds on each of a RUN step's three snapshot ops.
        self._db_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    # --- hooks for subclasses -------------------------------------------------

    def _populate(self, row: Row, chain: list[Row]) -> None:
        """Create the trees of new snapshot ``row`` (``chain``: parent first)."""
        raise NotImplementedError

    def _mounts_of(self, row: Row, chain: list[Row]) -> list[Mount]:
        raise NotImplementedError

    # --- layout -----------------------------------------------------------------

    def dir_of(self, ident: int) -> Path:
        return self.snapshots_dir / str(ident)

    def fs_of(self, ident: int) -> Path:
        return self.dir_of(ident) / "fs"

    # --- metadata ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        with self._init_lock:
            if not self._ready:
                self.snapshots_dir.mkdir(parents=True, exist_ok=True)
                self.tmp_dir.mkdir(exist_ok=True)
                conn = self._open()
                try:
                    enable_wal(conn, 60)
                    conn.executescript(_SCHEMA)
                    self._sweep(conn)
                finally:
                    conn.close()
                self._ready = True
        return self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._db_path, timeout=60, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL never corrupts and loses nothing on a process crash; a
        # power loss may drop the last commits, which only costs a rebuild (the
        # orphaned trees are swept). FULL would fsync on every prepare/commit.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """The process's connection, held for one operation (``_db_lock``)."""
        with self._db_lock:
            if self._db is None:
                self._db = self._connect()
            try:
                yield self._db
            finally:
                if self._db.in_transaction:  # a failed COMMIT or ROLLBACK: start afresh
                    self._db.close()
                    self._db = None

    def close(self) -> None:
        """Close the metadata connection (a later operation opens it again)."""
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _sweep(self, conn: sqlite3.Connection) -> None:
        # Leftovers of a process that died between deleting a row and its tree.
        names = os.listdir(self.snapshots_dir)
        live = {str(r[0]) for r in conn.execute("SELECT id FROM snapshots")}
        for name in names:
            if name not in live:
                rmtree(self.snapshots_dir / name)

    @staticmethod
    def _get(conn: sqlite3.Connection, key: str) -> Row | None:
        t = conn.execute("SELECT id, key, kind, parent FROM snapshots WHERE key = ?", (key,))
        found = t.fetchone()
        return None if found is None else _row(found)

    @staticmethod
    def _chain(conn: sqlite3.Connection, ident: int | None) -> list[Row]:
        if ident is None:
            return []
        return [_row(t) for t in conn.execute(_CHAIN, (ident,))]

    # --- operations (blocking; run in a thread) ---------------------------------

    def _create(self, key: str, parent: str | None, kind: Kind) -> list[Mount]:
        with self._tx() as conn:
            parent_id: int | None = None
            if parent is not None:
                p = self._get(conn, parent)
                if p is None or p.kind != "committed":
                    raise NotFoundError(f"parent snapshot {parent!r} is not a committed snapshot")
                parent_id = p.id
            try:
                cur = conn.execute(
                    "INSERT INTO snapshots (key, kind, parent) VALUES (?, ?, ?)",
                    (key, kind, parent_id),
                )
            except sqlite3.IntegrityError:
                raise FileExistsError(f"snapshot {key!r} already exists") from None
            row = Row(cast(int, cur.lastrowid), key, kind, parent_id)
            if self.owner is not None:
                conn.execute("INSERT INTO owners (id, owner) VALUES (?, ?)", (row.id, self.owner))
            chain = self._chain(conn, parent_id)
        try:
            self.dir_of(row.id).mkdir()
            self._populate(row, chain)
            return self._mounts_of(row, chain)
        except BaseException:
            with self._tx() as conn:
                conn.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
            rmtree(self.dir_of(row.id))
            raise

    def _commit(self, name: str, key: str) -> None:
        with self._tx() as conn:
            row = self._get(conn, key)
            if row is None or row.kind != "active":
                raise NotFoundError(f"no active snapshot {key!r} to commit")
            try:
                conn.execute(
                    "UPDATE snapshots SET key = ?, kind = 'committed' WHERE id = ?", (name, row.id)
                )
            except sqlite3.IntegrityError:
                raise FileExistsError(f"snapshot {name!r} already exists") from None
            # committed: the cache's now, no longer its maker's to drop
            conn.execute("DELETE FROM owners WHERE id = ?", (row.id,))

    def drop_owned(self, owner: str) -> int:
        """Remove the active and view snapshots of the dead worker process
        ``owner`` (blocking); how many. Its mounts must be gone first (a mounted
        one raises, and the caller's recovery is tried again at the next start)."""
        conn = self._connect()
        try:
            keys = [
                str(t[0])
                for t in conn.execute(
                    "SELECT s.key FROM snapshots s JOIN owners o ON o.id = s.id "
                    "WHERE o.owner = ? AND s.kind != 'committed' ORDER BY s.id DESC",
                    (owner,),
                )
            ]
        finally:
            conn.close()
        for key in keys:
            with contextlib.suppress(NotFoundError):  # removed meanwhile
                self._remove(key)
        return len(keys)

    def _remove(self, key: str) -> None:
        with self._tx() as conn:
            row = self._get(conn, key)
            if row is None:
                raise NotFoundError(f"no snapshot {key!r}")
            child = conn.execute(
                "SELECT key FROM snapshots WHERE parent = ? LIMIT 1", (row.id,)
            ).fetchone()
            if child is not None:
                raise UserError(
                    f"snapshot {key!r} is the parent of {child[0]!r}; remove its children first"
                )
            busy = mountpoints_under(self.dir_of(row.id))
            if busy:
                raise HostError(f"snapshot {key!r} is still mounted at {busy[0]}")
            conn.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        rmtree(self.dir_of(row.id))

    def _mounts(self, key: str) -> list[Mount]:
        with self._conn() as conn:
            row = self._get(conn, key)
            if row is None:
                raise NotFoundError(f"no snapshot {key!r}")
            if row.kind == "committed":
                raise UserError(f"snapshot {key!r} is committed; create a view of it to mount it")
            chain = self._chain(conn, row.parent)
        return self._mounts_of(row, chain)

    def _stat(self, key: str) -> SnapshotInfo | None:
        with self._conn() as conn:
            t = conn.execute(
                "SELECT s.key, s.kind, p.key FROM snapshots s "
                "LEFT JOIN snapshots p ON p.id = s.parent WHERE s.key = ?",
                (key,),
            ).fetchone()
        return None if t is None else SnapshotInfo(t[0], t[1], t[2])

    def _walk(self) -> list[SnapshotInfo]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT s.key, s.kind, p.key FROM snapshots s "
                "LEFT JOIN snapshots p ON p.id = s.parent ORDER BY s.id"
            ).fetchall()
        return [SnapshotInfo(t[0], t[1], t[2]) for t in rows]

    def _usage(self, key: str) -> int:
        with self._conn() as conn:
            row = self._get(conn, key)
        if row is None:
            raise NotFoundError(f"no snapshot {key!r}")
        return disk_usage(self.fs_of(row.id))

    # --- the Protocols ----------------------------------------------------------

    async def prepare(self, key: str, parent: str | None) -> Sequence[Mount]:
        return await asyncio.to_thread(self._create, key, parent, "active")

    async def view(self, key: str, parent: str | None) -> Sequence[Mount]:
        return await asyncio.to_thread(self._create, key, parent, "view")

    async def commit(self, name: str, key: str) -> None:
        await asyncio.to_thread(self._commit, name, key)

    async def remove(self, key: str) -> None:
        await asyncio.to_thread(self._remove, key)

    async def mounts(self, key: str) -> Sequence[Mount]:
        return await asyncio.to_thread(self._mounts, key)

    async def stat(self, key: str) -> SnapshotInfo | None:
        return await asyncio.to_thread(self._stat, key)

    async def usage(self, key: str) -> int:
        return await asyncio.to_thread(self._usage, key)

    async def walk(self) -> Sequence[SnapshotInfo]:
        return await asyncio.to_thread(self._walk)

    async def recover(self) -> int:
        """Drop every active and view snapshot (left by a process that died while
        using them; nothing may have them mounted any more); how many."""
        return await access.drop_uncommitted(self, self)
