"""Content hashes of context files, remembered across processes.

An embedded worker is a new process on every build: without this, an unchanged
rebuild would read and hash every file a COPY selects again (BuildKit keeps its
context checksums in its own database for the same reason). A hash is looked up by
the file's identity: real path, device, inode, size, mtime and ctime. A write moves
ctime forward, and ctime cannot be set back, so a changed file is never matched.
Which hashes are worth keeping is the caller's rule (``ops.context``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from ociworker.fs.sqlite import enable_wal

#: rows kept; beyond it the oldest go (hashes of files long changed or gone)
MAX_ROWS = 200_000

#: path, device, inode, size, mtime_ns, ctime_ns
FileKey = tuple[str, int, int, int, int, int]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (path, dev, ino, size, mtime, ctime)
)
"""


class SQLiteFileHashes:
    """The memo in its own SQLite file (one connection, taken in turn)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        enable_wal(self._db, 30)
        # losing the last entries to a power cut only costs hashing them again
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def under(self, directory: str) -> dict[FileKey, str]:
        low = directory.rstrip("/") + "/"
        high = low[:-1] + chr(ord("/") + 1)  # every path that starts with low sorts below
        with self._lock:
            rows = self._db.execute(
                "SELECT path, dev, ino, size, mtime, ctime, digest FROM file_hashes "
                "WHERE path >= ? AND path < ?",
                (low, high),
            ).fetchall()
        return {(r[0], r[1], r[2], r[3], r[4], r[5]): r[6] for r in rows}

    def put_many(self, items: Iterable[tuple[FileKey, str]]) -> None:
        rows = [(*key, digest) for key, digest in items]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO file_hashes "
                    "(path, dev, ino, size, mtime, ctime, digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                (count,) = self._db.execute("SELECT count(*) FROM file_hashes").fetchone()
                if count > MAX_ROWS:
                    self._db.execute(
                        "DELETE FROM file_hashes WHERE rowid IN "
                        "(SELECT rowid FROM file_hashes ORDER BY rowid LIMIT ?)",
                        (count - MAX_ROWS * 3 // 4,),
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
