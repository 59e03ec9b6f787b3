"""Which layer blob each snapshot became: the differ's work, remembered.

A built snapshot is diffed once per compression; a pulled layer's snapshot
(named by ChainID) is recorded as ``source`` and exported as it came, and a
repository of each registry known to hold a blob (pulled from or pushed to) is
kept for pushes: a cross-repository mount instead of an upload. The tables live
in the state dir's ``cache.db`` beside the cache records (their own connection),
so a restart keeps them.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Protocol

from ociworker.core.digest import check_digest
from ociworker.core.oci import Descriptor, Layer
from ociworker.core.reference import parse_reference
from ociworker.fs.sqlite import enable_wal

#: the compression key under which a pulled layer is recorded
SOURCE = "source"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    snapshot TEXT NOT NULL,
    compression TEXT NOT NULL,
    media_type TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    diff_id TEXT NOT NULL,
    PRIMARY KEY (snapshot, compression)
);
CREATE TABLE IF NOT EXISTS blob_sources (
    digest TEXT NOT NULL,
    registry TEXT NOT NULL,
    repository TEXT NOT NULL,
    PRIMARY KEY (digest, registry)
);
"""


class LayerCache(Protocol):
    def get_layer(self, snapshot: str, compression: str) -> Layer | None: ...

    def put_layer(self, snapshot: str, compression: str, layer: Layer) -> None: ...

    def forget_layers(self, snapshot: str) -> None: ...

    def put_source(self, digest: str, repository: str) -> None:
        """``digest`` is in ``repository`` (``host/path``: pulled from there or
        pushed there): a later push to that registry can mount it from there."""
        ...

    def source_of(self, digest: str, registry: str) -> str | None:
        """A repository of ``registry`` (``host[:port]``) known to hold ``digest``."""
        ...


class SQLiteLayerCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        enable_wal(self._db, 30)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(layers)")}
        if "created" not in columns:  # a state dir from before layers were dated
            try:
                self._db.execute("ALTER TABLE layers ADD COLUMN created REAL")
            except sqlite3.OperationalError:
                # two processes opening a new root at once: the other one added it
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(layers)")}
                if "created" not in columns:
                    raise

    def close(self) -> None:
        self._db.close()

    def get_layer(self, snapshot: str, compression: str) -> Layer | None:
        row = self._db.execute(
            "SELECT media_type, digest, size, diff_id, created FROM layers"
            " WHERE snapshot = ? AND compression = ?",
            (snapshot, compression),
        ).fetchone()
        if row is None:
            return None
        desc = Descriptor(row[0], check_digest(row[1]), int(row[2]))
        return Layer(desc, check_digest(row[3]), None if row[4] is None else float(row[4]))

    def put_layer(self, snapshot: str, compression: str, layer: Layer) -> None:
        # A snapshot's date is that of its first layer, whatever the compression,
        # so the image's history does not change with the output's options.
        self._db.execute(
            "INSERT OR REPLACE INTO layers"
            " (snapshot, compression, media_type, digest, size, diff_id, created)"
            " VALUES (?, ?, ?, ?, ?, ?,"
            " COALESCE((SELECT MIN(created) FROM layers WHERE snapshot = ?), ?))",
            (
                snapshot,
                compression,
                layer.descriptor.media_type,
                layer.descriptor.digest,
                layer.descriptor.size,
                layer.diff_id,
                snapshot,
                layer.created if layer.created is not None else time.time(),
            ),
        )

    def forget_layers(self, snapshot: str) -> None:
        self._db.execute("DELETE FROM layers WHERE snapshot = ?", (snapshot,))

    def blobs_of(self, snapshot: str) -> list[str]:
        """Digests of the layer blobs made from ``snapshot`` (for du and GC)."""
        rows = self._db.execute("SELECT digest FROM layers WHERE snapshot = ?", (snapshot,))
        return [str(r[0]) for r in rows.fetchall()]

    def blob_in_use(self, digest: str) -> bool:
        row = self._db.execute("SELECT 1 FROM layers WHERE digest = ? LIMIT 1", (digest,))
        return row.fetchone() is not None

    def put_source(self, digest: str, repository: str) -> None:
        registry = parse_reference(repository).domain
        self._db.execute(
            "INSERT OR REPLACE INTO blob_sources (digest, registry, repository) VALUES (?, ?, ?)",
            (digest, registry, repository),
        )

    def source_of(self, digest: str, registry: str) -> str | None:
        row = self._db.execute(
            "SELECT repository FROM blob_sources WHERE digest = ? AND registry = ?",
            (digest, registry),
        ).fetchone()
        return str(row[0]) if row is not None else None
