"""Named images: reference -> manifest descriptor, persisted in SQLite.

SQLite in WAL mode gives atomic updates that survive a crash and lets two
processes (a daemon and a CLI, or two workers) share one store: readers never
block, writers queue behind ``busy_timeout``. Each call opens its own short
connection, so an ``ImageStore`` can be used from any thread.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ociworker.core.oci import Descriptor
from ociworker.core.reference import parse_reference
from ociworker.errors import WorldError
from ociworker.fs.sqlite import enable_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name       TEXT PRIMARY KEY,
    descriptor TEXT NOT NULL,
    created    REAL NOT NULL,
    updated    REAL NOT NULL
)
"""
_BUSY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StoredImage:
    name: str
    descriptor: Descriptor
    created: float  # unix time of the first put under this name
    updated: float  # unix time of the last put that changed the descriptor


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "images.db"
        with self._db() as db:
            enable_wal(db, _BUSY_TIMEOUT_S)
            db.execute(_SCHEMA)

    def put(self, name: str, desc: Descriptor) -> None:
        name = normalize_name(name)
        now = time.time()
        text = json.dumps(desc.to_json(), sort_keys=True)
        with self._db() as db:
            # A rebuild that changed nothing tags the same manifest again: a read
            # answers that, where a write would cost a commit (and its fsync) per build.
            row = db.execute("SELECT descriptor FROM images WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] == text:
                return
            db.execute(
                "INSERT INTO images (name, descriptor, created, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET "
                "descriptor = excluded.descriptor, updated = excluded.updated",
                (name, text, now, now),
            )

    def get(self, name: str) -> Descriptor | None:
        rec = self.record(name)
        return rec.descriptor if rec is not None else None

    def record(self, name: str) -> StoredImage | None:
        name = normalize_name(name)
        with self._db() as db:
            row = db.execute(
                "SELECT name, descriptor, created, updated FROM images WHERE name = ?", (name,)
            ).fetchone()
        return _row(row) if row is not None else None

    def list(self) -> builtins.list[tuple[str, Descriptor]]:
        return [(r.name, r.descriptor) for r in self.records()]

    def records(self) -> builtins.list[StoredImage]:
        with self._db() as db:
            rows = db.execute(
                "SELECT name, descriptor, created, updated FROM images ORDER BY name"
            ).fetchall()
        return [_row(r) for r in rows]

    def delete(self, name: str) -> bool:
        """Remove ``name``; False when it did not exist."""
        name = normalize_name(name)
        with self._db() as db:
            cur = db.execute("DELETE FROM images WHERE name = ?", (name,))
        return cur.rowcount > 0

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            with closing(sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)) as conn, conn:
                yield conn
        except sqlite3.DatabaseError as e:
            raise WorldError(f"image store {self.path}: {e}") from e


def normalize_name(name: str) -> str:
    """The canonical form under which ``name`` is stored (``foo`` ->
    ``docker.io/library/foo:latest``), so every spelling finds the same entry."""
    return str(parse_reference(name))


def _row(row: tuple[str, str, float, float]) -> StoredImage:
    return StoredImage(
        name=row[0],
        descriptor=Descriptor.from_json(json.loads(row[1])),
        created=row[2],
        updated=row[3],
    )
