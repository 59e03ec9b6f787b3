"""Opening SQLite state files that several worker processes share."""

from __future__ import annotations

import sqlite3
import time


def enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the database in WAL mode, waiting for other openers up to ``timeout``.

    Switching the journal mode takes an exclusive lock, and SQLite answers
    "database is locked" at once instead of calling the busy handler; so two
    processes opening a fresh database together would fail without this retry.
    Once a file is in WAL mode (the mode is stored in it) the first check needs
    no lock and returns.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
