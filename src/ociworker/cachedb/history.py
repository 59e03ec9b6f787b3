"""The build history store: one SQLite file under the root (``history.db``),
a row per build (its ``BuildRecord`` as JSON) and its progress events (what
``history logs`` replays), kept within a count and an age."""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ociworker.core.history import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_ENTRIES,
    BuildRecord,
    expired,
    resolve_ref,
)
from ociworker.errors import NotFoundError
from ociworker.fs.sqlite import enable_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    dockerfile TEXT NOT NULL,
    target TEXT NOT NULL,
    record BLOB NOT NULL,
    events BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_created ON builds (created);
"""


class SQLiteHistory:
    def __init__(
        self,
        path: Path,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        enable_wal(self._db, 30)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.max_entries = max_entries
        self.max_age = max_age

    def close(self) -> None:
        self._db.close()

    def put(self, record: BuildRecord, events: Sequence[dict[str, Any]]) -> None:
        """Keep ``record`` (replacing one of its id), then drop what the limits say."""
        self._db.execute(
            "INSERT OR REPLACE INTO builds (id, created, dockerfile, target, record, events)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.created,
                record.dockerfile,
                record.target,
                _pack(record.to_json()),
                _pack(list(events)),
            ),
        )
        rows = self._db.execute("SELECT id, created FROM builds").fetchall()
        for rid in expired(rows, self.max_entries, self.max_age):
            self._db.execute("DELETE FROM builds WHERE id = ?", (rid,))

    def ids(self) -> list[str]:
        """Every kept build's id, newest first."""
        return [r[0] for r in self._db.execute("SELECT id FROM builds ORDER BY created DESC")]

    def records(self) -> list[BuildRecord]:
        rows = self._db.execute("SELECT record FROM builds ORDER BY created DESC").fetchall()
        return [BuildRecord.from_json(_unpack(r[0])) for r in rows]

    def get(self, ref: str) -> BuildRecord:
        rid = resolve_ref(ref, self.ids())
        row = self._db.execute("SELECT record FROM builds WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no build record {ref!r}")
        return BuildRecord.from_json(_unpack(row[0]))

    def events(self, ref: str) -> list[dict[str, Any]]:
        rid = resolve_ref(ref, self.ids())
        row = self._db.execute("SELECT events FROM builds WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no build record {ref!r}")
        got: list[dict[str, Any]] = _unpack(row[0])
        return got

    def remove(self, refs: Sequence[str]) -> list[str]:
        """Remove the builds ``refs`` name (all are resolved first: one bad
        name removes nothing); their ids."""
        ids = self.ids()
        gone = [resolve_ref(r, ids) for r in refs]
        for rid in gone:
            self._db.execute("DELETE FROM builds WHERE id = ?", (rid,))
        return gone

    def previous(self, record: BuildRecord) -> BuildRecord | None:
        """The closest earlier build of the same Dockerfile and target."""
        return self.previous_of(record.dockerfile, record.target, record.id)

    def previous_of(self, dockerfile: str, target: str, exclude: str) -> BuildRecord | None:
        """The newest kept build of ``dockerfile`` and ``target`` other than ``exclude``."""
        row = self._db.execute(
            "SELECT record FROM builds WHERE dockerfile = ? AND target = ? AND id != ?"
            " ORDER BY created DESC LIMIT 1",
            (dockerfile, target, exclude),
        ).fetchone()
        return BuildRecord.from_json(_unpack(row[0])) if row else None


# Records are JSON, compressed: a step's list of context files (names repeat
# their directories) and its logs shrink several times.
def _pack(value: Any) -> bytes:
    return zlib.compress(json.dumps(value).encode(), 6)


def _unpack(blob: bytes) -> Any:
    return json.loads(zlib.decompress(blob))
