"""The context's file hashes kept on disk (``cachedb.filehashes``): a later process's
checksum of an unchanged context is the same without reading the files again, and
any change to a file (even one that keeps its size and mtime) changes the checksum."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from ociworker.cachedb import filehashes
from ociworker.cachedb.filehashes import SQLiteFileHashes
from ociworker.core.graph import Copy
from ociworker.ops import context
from ociworker.ops.context import ContextChecksums, LocalContext


def _settle(path: Path) -> None:
    """Make ``path`` look written long ago: its hash may then be kept. (ctime cannot be
    set back, so the test moves the threshold instead; see ``settled_now``.)"""
    old = time.time() - 3600
    os.utime(path, (old, old))


@pytest.fixture
def settled_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # every file of the test counts as settled (its ctime is "now")
    monkeypatch.setattr(context, "SETTLED_NS", -60_000_000_000)


def _checksum(db: Path, ctx: Path) -> str:
    memo = SQLiteFileHashes(db)
    try:
        return ContextChecksums(memo).content_checksum(LocalContext(ctx, None), [Copy(1, ".", "/")])
    finally:
        memo.close()


def _context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "d").mkdir(parents=True)
    (ctx / "a.txt").write_text("alpha\n")
    (ctx / "d" / "b.bin").write_bytes(os.urandom(4096))
    for p in (ctx / "a.txt", ctx / "d" / "b.bin"):
        _settle(p)
    return ctx


def test_a_later_process_reuses_the_kept_hashes(tmp_path: Path, settled_now: None) -> None:
    ctx, db = _context(tmp_path), tmp_path / "filehashes.db"
    without_memo = ContextChecksums().content_checksum(LocalContext(ctx, None), [Copy(1, ".", "/")])
    first = _checksum(db, ctx)
    assert first == without_memo
    # what was kept is each file's sha256, under the file's real path
    memo = SQLiteFileHashes(db)
    kept = {k[0]: d for k, d in memo.under(str(ctx)).items()}
    memo.close()
    assert kept == {
        str(ctx / "a.txt"): hashlib.sha256(b"alpha\n").hexdigest(),
        str(ctx / "d" / "b.bin"): hashlib.sha256((ctx / "d" / "b.bin").read_bytes()).hexdigest(),
    }
    # a new process (new ContextChecksums) answers the same from them
    assert _checksum(db, ctx) == first
    # ... and does not read the file: a kept hash is what it uses (one put here under
    # the file's own identity stands for a file it would have read otherwise)
    memo = SQLiteFileHashes(db)
    key = next(k for k in memo.under(str(ctx)) if k[0].endswith("b.bin"))
    memo.put_many([(key, "0" * 64)])
    memo.close()
    assert _checksum(db, ctx) != first


def test_a_rewrite_that_keeps_size_and_mtime_changes_the_checksum(
    tmp_path: Path, settled_now: None
) -> None:
    ctx, db = _context(tmp_path), tmp_path / "filehashes.db"
    first = _checksum(db, ctx)
    st = (ctx / "a.txt").stat()
    (ctx / "a.txt").write_text("ALPHA\n")  # same size
    os.utime(ctx / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: ctime moved
    second = _checksum(db, ctx)
    assert second != first
    assert second == ContextChecksums().content_checksum(
        LocalContext(ctx, None), [Copy(1, ".", "/")]
    )


def test_a_file_written_just_now_is_not_kept(tmp_path: Path) -> None:
    # the default threshold: a file whose ctime is this second may still change
    # within the same clock tick, so its hash is made again next time
    ctx, db = _context(tmp_path), tmp_path / "filehashes.db"
    _checksum(db, ctx)
    memo = SQLiteFileHashes(db)
    assert memo.under(str(ctx)) == {}
    memo.close()


def test_other_directories_are_not_loaded(tmp_path: Path, settled_now: None) -> None:
    ctx, db = _context(tmp_path), tmp_path / "filehashes.db"
    _checksum(db, ctx)
    memo = SQLiteFileHashes(db)
    assert memo.under(str(tmp_path / "ct")) == {}  # a prefix of the name, not a parent
    assert len(memo.under(str(tmp_path))) == 2
    memo.close()


def test_the_oldest_rows_go_beyond_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filehashes, "MAX_ROWS", 8)
    memo = SQLiteFileHashes(tmp_path / "filehashes.db")
    for i in range(20):
        memo.put_many([((f"/c/f{i}", 1, i, 1, 0, 0), f"{i:064x}")])
    left = sorted(k[2] for k in memo.under("/c"))
    memo.close()
    assert len(left) <= 8
    assert left == list(range(20 - len(left), 20))  # the newest are kept
