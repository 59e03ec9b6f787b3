"""What a worker process killed with SIGKILL leaves in the snapshotter and the
content store is found by its owner id (``executor.owners``) and removed, and
nothing of another process's (issue 18 item 1: before, only a daemon's start
swept them, and only when no other worker process was alive on the root).

Two snapshotter objects on one root stand for two worker processes; what is
left is read from the snapshotter's SQLite database and the directories."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ociworker.content.store import ContentStore
from ociworker.core.digest import sha256_bytes
from ociworker.snapshot.native import NativeSnapshotter


def _rows(root: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(root / "metadata.db") as db:
        return {k: (kind, i) for i, k, kind in db.execute("SELECT id, key, kind FROM snapshots")}


async def test_a_dead_owners_snapshots_in_use_go_and_no_one_elses(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    dead, live = NativeSnapshotter(root), NativeSnapshotter(root)
    dead.owner, live.owner = "dead0001", "live0002"
    await dead.prepare("base-active", None)
    await dead.commit("base", "base-active")
    await dead.prepare("active-dead", "base")
    await dead.view("view-dead", "base")
    await dead.prepare("made-by-dead", "base")
    await dead.commit("committed-by-dead", "made-by-dead")
    await live.prepare("active-live", "base")
    await live.view("view-live", "base")
    before = _rows(root)

    assert NativeSnapshotter(root).drop_owned("dead0001") == 2

    after = _rows(root)
    assert set(after) == set(before) - {"active-dead", "view-dead"}
    for key in ("active-dead", "view-dead"):
        assert not (root / "snapshots" / str(before[key][1])).exists()
    # what it committed is the cache's; the live process's snapshots are whole
    assert after["committed-by-dead"][0] == "committed"
    assert await live.mounts("active-live") and await live.mounts("view-live")
    assert NativeSnapshotter(root).drop_owned("dead0001") == 0


def test_a_dead_owners_unfinished_blobs_go_and_no_one_elses(tmp_path: Path) -> None:
    dead = ContentStore(tmp_path / "content", owner="dead0001")
    live = ContentStore(tmp_path / "content", owner="live0002")
    ingest = tmp_path / "content" / "ingest"
    w_dead = dead.ingest()
    w_dead.write(b"half of a blob")
    w_live = live.ingest()
    w_live.write(b"a blob being written")
    assert len(list(ingest.iterdir())) == 2

    assert ContentStore(tmp_path / "content").drop_ingests("dead0001") == 1

    # the live process's write goes on and commits
    digest = w_live.commit()
    assert digest == sha256_bytes(b"a blob being written")
    assert live.read(digest) == b"a blob being written"
    assert list(ingest.iterdir()) == []
    w_dead.__exit__(None, None, None)
