"""Persistent cache index: cache key -> result (the solver's ``CacheIndex``).

SQLite in WAL mode under the state dir, so several worker processes on one
root read concurrently and a crash loses at most the record being written.
Records point at snapshots; a record whose snapshot has vanished is treated as
a miss (``validate``) and dropped, so the index can never resurrect a result
that no longer exists.
"""

from __future__ import annotations

import sqlite3
import time
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
    last_used REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Record:
    key: str
    result: Result
    description: str
    created: float
    last_used: float


async def _always_valid(_: Result) -> bool:
    return True


class SQLiteCacheIndex:
    def __init__(self, path: Path, validate: Validator = _always_valid) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        enable_wal(self._db, 30)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
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
        self._db.execute("UPDATE records SET last_used = ? WHERE key = ?", (time.time(), key))
        return result

    async def record(self, key: str, result: Result, description: str) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO records (key, kind, ref, description, created, last_used)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET kind = excluded.kind, ref = excluded.ref,"
            " description = excluded.description, last_used = excluded.last_used",
            (key, result.kind, result.ref, description, now, now),
        )

    # -- management ---------------------------------------------------------------

    def records(self) -> list[Record]:
        rows = self._db.execute(
            "SELECT key, kind, ref, description, created, last_used FROM records ORDER BY created"
        ).fetchall()
        return [Record(r[0], Result(r[1], r[2]), r[3], r[4], r[5]) for r in rows]

    def remove(self, key: str) -> None:
        self._db.execute("DELETE FROM records WHERE key = ?", (key,))
