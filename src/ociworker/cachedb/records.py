"""Persistent cache index: cache key -> result (the solver's ``CacheIndex``).

SQLite in WAL mode under the state dir, so several worker processes on one
root read concurrently and a crash loses at most the record being written.
Records point at snapshots; a record whose snapshot has vanished is treated as
a miss (``validate``) and dropped, so the index can never resurrect a result
that no longer exists.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ociworker.fs.sqlite import enable_wal
from ociworker.solver.scheduler import Result

Validator = Callable[[Result], Awaitable[bool]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    usage_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    started REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Record:
    key: str
    result: Result
    description: str
    created: float
    last_used: float
    usage_count: int = 0


def _pid_start(pid: int) -> str:
    """When process ``pid`` started (field 22 of /proc/PID/stat), so a reused
    pid is not taken for the process that held a lease; "" if there is none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


async def _always_valid(_: Result) -> bool:
    return True


class SQLiteCacheIndex:
    def __init__(self, path: Path, validate: Validator = _always_valid) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        enable_wal(self._db, 30)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(records)")}
        if "usage_count" not in cols:  # a root written before du counted uses
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                self._db.execute(
                    "ALTER TABLE records ADD COLUMN usage_count INTEGER NOT NULL DEFAULT 0"
                )
        self._validate = validate

    def close(self) -> None:
        self._db.close()

    # -- CacheIndex Protocol ----------------------------------------------------

    async def lookup(self, key: str) -> Result | None:
        row = self._db.execute("SELECT kind, ref FROM records WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        result = Result(row[0], row[1])
        if not await self._validate(result):
            self._db.execute("DELETE FROM records WHERE key = ?", (key,))
            return None
        cur = self._db.execute(
            "UPDATE records SET last_used = ?, usage_count = usage_count + 1 WHERE key = ?",
            (time.time(), key),
        )
        # Removed by a prune since the SELECT: its snapshot may be going, so a miss.
        return result if cur.rowcount else None

    async def record(self, key: str, result: Result, description: str) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO records (key, kind, ref, description, created, last_used, usage_count)"
            " VALUES (?, ?, ?, ?, ?, ?, 1)"
            " ON CONFLICT(key) DO UPDATE SET kind = excluded.kind, ref = excluded.ref,"
            " description = excluded.description, last_used = excluded.last_used,"
            " usage_count = records.usage_count + 1",
            (key, result.kind, result.ref, description, now, now),
        )

    # -- management ---------------------------------------------------------------

    def records(self) -> list[Record]:
        rows = self._db.execute(
            "SELECT key, kind, ref, description, created, last_used, usage_count"
            " FROM records ORDER BY created"
        ).fetchall()
        return [Record(r[0], Result(r[1], r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    def remove(self, key: str) -> None:
        self._db.execute("DELETE FROM records WHERE key = ?", (key,))

    def newest_created(self) -> float:
        """When the newest record was written (0 when there is none)."""
        row = self._db.execute("SELECT MAX(created) FROM records").fetchone()
        return float(row[0] or 0.0)

    def remove_unused_since(self, key: str, last_used: float) -> bool:
        """Remove ``key`` unless it was used after ``last_used`` (by a build that
        looked it up since the caller read it); whether it was removed."""
        cur = self._db.execute(
            "DELETE FROM records WHERE key = ? AND last_used <= ?", (key, last_used)
        )
        return bool(cur.rowcount)

    # -- leases: what running builds hold ---------------------------------------

    def lease(self) -> str:
        """A lease for a build starting now: every record used from now until
        ``release`` is held by it (a record's last use is then after the lease
        started), so no prune or GC of any process on this root removes it."""
        lease_id = uuid.uuid4().hex
        pid = os.getpid()
        self._db.execute(
            "INSERT INTO leases (id, pid, pid_start, started) VALUES (?, ?, ?, ?)",
            (lease_id, pid, _pid_start(pid), time.time()),
        )
        return lease_id

    def release(self, lease_id: str) -> None:
        self._db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))

    def held_since(self) -> float | None:
        """When the oldest live lease started (None: no build holds anything).
        Leases of processes that are gone (a crash) are released here."""
        oldest: float | None = None
        for lease_id, pid, pid_start, started in self._db.execute(
            "SELECT id, pid, pid_start, started FROM leases"
        ).fetchall():
            if _pid_start(pid) != pid_start or not pid_start:
                self.release(lease_id)
                continue
            oldest = started if oldest is None else min(oldest, started)
        return oldest
