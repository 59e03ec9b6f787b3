"""The incremental context sync engine (session/filesync.py), both ends, on tmp dirs.

Each test syncs a real source tree through ``scan`` / ``read_chunks`` into a
``ContextStore`` and compares the trees entry by entry (type, mode, size,
mtime, owner, content or link target). Hostile cases keep a sentinel dir next
to the store and check it is byte-for-byte unchanged afterwards, and that the
key's previous copy still serves the next sync. Ownership needs root; without
it those checks are skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ociworker.errors import HostError, UnsafePathError, UserError
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.session import filesync
from ociworker.session.filesync import ContextStore, FileStat, Transfer, read_chunks, scan

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chown needs root")
T0 = 1_600_000_000_000_000_123  # ns, with a sub-second part that must survive


# --- helpers ----------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below ``root`` (not following links) with what a sync must keep."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode):
                body: object = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            else:
                body = None
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            owner = (st.st_uid, st.st_gid) if ROOT else None
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size,
                        st.st_mtime_ns, owner, body)  # fmt: skip
    return out


@dataclass
class Synced:
    wanted: list[str]
    bytes_received: int
    tree: Path


def send(t: Transfer, src: Path, stats: Sequence[FileStat]) -> None:
    sizes = {s.path: s.size for s in stats}
    for path in t.wanted:
        for chunk in read_chunks(src, path, chunk=7, size=sizes[path]):
            t.write(path, chunk)


def sync(store: ContextStore, key: str, src: Path, ignore: IgnoreMatcher | None = None) -> Synced:
    stats = scan(src, ignore)
    with store.begin(key, stats) as t:
        wanted = list(t.wanted)
        send(t, src, stats)
        tree = t.finish()
        return Synced(wanted, t.bytes_received, tree)


def put(root: Path, rel: str, data: bytes = b"x", mode: int = 0o644, mtime: int = T0) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    p.chmod(mode)
    os.utime(p, ns=(mtime, mtime))
    return p


def settle_dirs(root: Path) -> None:
    """Fixed mtimes on every dir (writing children moves them), deepest first."""
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        os.utime(dirpath, ns=(T0, T0))


@dataclass
class Env:
    src: Path
    store: ContextStore
    store_root: Path
    sentinel: Path

    def sync(self, key: str = "host:/ctx:Dockerfile", ignore: list[str] | None = None) -> Synced:
        settle_dirs(self.src)
        return sync(self.store, key, self.src, IgnoreMatcher(ignore) if ignore else None)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    src, store_root, sentinel = tmp_path / "src", tmp_path / "contexts", tmp_path / "sentinel"
    src.mkdir()
    sentinel.mkdir()
    put(sentinel, "keep", b"sentinel")
    (sentinel / "sub").mkdir()
    before = snapshot(sentinel)
    yield Env(src, ContextStore(store_root), store_root, sentinel)
    assert snapshot(sentinel) == before, "something wrote outside the store"


def regular(stats: Sequence[FileStat]) -> list[str]:
    return [s.path for s in stats if stat.S_ISREG(s.mode)]


# --- round trip -------------------------------------------------------------------


def make_tree(src: Path) -> None:
    put(src, "Dockerfile", b"FROM scratch\n")
    put(src, "bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    put(src, "bin/setuid", b"s", 0o4750)
    put(src, "private", b"p" * 3000, 0o600)
    put(src, "empty", b"")
    put(src, "ro/inside", b"in a read-only dir")
    (src / "ro").chmod(0o555)
    (src / "emptydir").mkdir()
    (src / "emptydir").chmod(0o700)
    os.symlink("bin/tool", src / "rel-link")
    os.symlink("/etc/passwd", src / "abs-link")
    os.symlink("../../nowhere", src / "bin/dangling")
    os.symlink("bin", src / "dir-link")
    put(src, os.fsdecode(b"latin1-\xe9"), b"not utf-8 name")
    # .dockerignore material
    put(src, "app.log", b"log")
    put(src, "bin/debug.log", b"log")
    put(src, "build/out.o", b"obj")
    put(src, "build/keep/readme.txt", b"kept")
    put(src, "build/keep/skip.o", b"obj")
    put(src, "node_modules/pkg/index.js", b"js")
    put(src, ".dockerignore", b"**/*.log\nbuild\n!build/keep/*.txt\nnode_modules\n")
    (src / "build").chmod(0o750)
    if ROOT:
        os.lchown(src / "private", 1234, 5678)
        os.lchown(src / "rel-link", 4321, 8765)
        os.lchown(src / "ro", 1000, 1000)


IGNORE = ["**/*.log", "build", "!build/keep/*.txt", "node_modules"]
EXPECTED = {
    ".dockerignore",
    "Dockerfile",
    "bin",
    "bin/tool",
    "bin/setuid",
    "bin/dangling",
    "private",
    "empty",
    "ro",
    "ro/inside",
    "emptydir",
    "rel-link",
    "abs-link",
    "dir-link",
    os.fsdecode(b"latin1-\xe9"),
    # build is excluded, but a file below it is re-included: its parents come along
    "build",
    "build/keep",
    "build/keep/readme.txt",
}


def test_scan_applies_dockerignore_with_exceptions_and_keeps_links(env: Env) -> None:
    make_tree(env.src)
    settle_dirs(env.src)
    stats = scan(env.src, IgnoreMatcher(IGNORE))
    assert [s.path for s in stats] == sorted(EXPECTED)
    by = {s.path: s for s in stats}
    assert by["abs-link"].linkname == "/etc/passwd"
    assert stat.S_ISLNK(by["dir-link"].mode)
    assert by["private"].size == 3000
    # a re-included file's excluded parent keeps its own metadata
    assert stat.S_IMODE(by["build"].mode) == 0o750
    assert all(s.mtime_ns == T0 for s in stats if not stat.S_ISLNK(s.mode))


def test_round_trip_reproduces_the_selected_tree(env: Env) -> None:
    make_tree(env.src)
    first = env.sync(ignore=IGNORE)
    assert first.wanted == sorted(p for p in EXPECTED if (env.src / p).is_file()
                                  and not (env.src / p).is_symlink())  # fmt: skip
    want = {k: v for k, v in snapshot(env.src).items() if k in EXPECTED}
    assert snapshot(first.tree) == want
    assert first.tree.parent == env.store_root
    assert first.bytes_received == sum(len(v[5]) for v in want.values() if isinstance(v[5], bytes))


def test_store_names_by_key_digest_only(env: Env) -> None:
    put(env.src, "f")
    key = "../../sentinel/evil"
    out = env.sync(key=key)
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert out.tree == env.store_root / digest
    names = {p.name.split(".")[0] for p in env.store_root.iterdir()}
    assert names == {digest}


# --- incremental ------------------------------------------------------------------


def test_second_sync_sends_only_the_changed_file(env: Env) -> None:
    for i in range(20):
        put(env.src, f"d{i % 3}/f{i}", bytes([65 + i]) * (100 + i))
    first = env.sync()
    assert len(first.wanted) == 20
    again = env.sync()
    assert (again.wanted, again.bytes_received) == ([], 0)
    put(env.src, "d1/f4", b"changed, longer than before", mtime=T0 + 1)
    third = env.sync()
    assert third.wanted == ["d1/f4"]
    assert third.bytes_received == len(b"changed, longer than before")
    assert snapshot(third.tree) == snapshot(env.src)


def test_mtime_only_change_resends(env: Env) -> None:
    # same size, same mode: only the mtime says the content may differ (buildx resends too)
    put(env.src, "a", b"AAAA")
    put(env.src, "b", b"BBBB")
    env.sync()
    put(env.src, "a", b"CCCC", mtime=T0 + 5)
    out = env.sync()
    assert out.wanted == ["a"]
    assert (out.tree / "a").read_bytes() == b"CCCC"


def test_mode_change_resends_and_owner_change_does_not(env: Env) -> None:
    put(env.src, "a", b"A", 0o644)
    put(env.src, "b", b"B", 0o644)
    env.sync()
    (env.src / "a").chmod(0o600)
    if ROOT:
        os.lchown(env.src / "b", 77, 88)
    out = env.sync()
    assert out.wanted == ["a"]
    assert snapshot(out.tree) == snapshot(env.src)


def test_deleted_and_renamed_entries_follow_the_source(env: Env) -> None:
    put(env.src, "gone", b"bye")
    put(env.src, "old/sub/f", b"data")
    os.symlink("old/sub", env.src / "to-sub")
    env.sync()
    os.unlink(env.src / "gone")
    os.rename(env.src / "old", env.src / "new")
    os.unlink(env.src / "to-sub")
    out = env.sync()
    # a rename is a new name to the worker: its files are sent again
    assert out.wanted == ["new/sub/f"]
    assert snapshot(out.tree) == snapshot(env.src)


@pytest.mark.parametrize(
    "change",
    [
        "dir->file",
        "file->dir",
        "file->symlink",
        "symlink->file",
        "symlink->dir",
        "dir->symlink",
        "symlink retarget",
    ],
)
def test_type_changes_between_syncs(env: Env, change: str) -> None:
    before, after = change.split("->") if "->" in change else ("symlink", "symlink2")

    def make(kind: str) -> None:
        p = env.src / "x"
        if kind == "dir":
            put(env.src, "x/inner/f", b"inner")
        elif kind == "file":
            put(env.src, "x", b"file")
        elif kind == "symlink":
            os.symlink("/etc", p)
        else:
            os.symlink("elsewhere", p)

    put(env.src, "other", b"o")
    make(before)
    env.sync()
    p = env.src / "x"
    if p.is_dir() and not p.is_symlink():
        (p / "inner/f").unlink()
        (p / "inner").rmdir()
        p.rmdir()
    else:
        p.unlink()
    make(after)
    out = env.sync()
    assert out.wanted == [s.path for s in scan(env.src, None)
                          if s.path.startswith("x") and stat.S_ISREG(s.mode)]  # fmt: skip
    assert snapshot(out.tree) == snapshot(env.src)


def test_symlink_replaced_by_dir_is_never_written_through(env: Env) -> None:
    # the synced tree holds links to the sentinel; the next list makes them dirs
    # (with files of the sentinel's names) and files: nothing may land in the sentinel
    os.symlink(str(env.sentinel), env.src / "abs")
    os.symlink("../../sentinel", env.src / "rel")
    os.symlink(str(env.sentinel / "keep"), env.src / "file-link")
    env.sync()
    for name in ("abs", "rel", "file-link"):
        os.unlink(env.src / name)
    put(env.src, "abs/keep", b"not the sentinel")
    put(env.src, "abs/sub/x", b"x")
    put(env.src, "rel/keep", b"not the sentinel")
    put(env.src, "file-link", b"not the sentinel")
    out = env.sync()
    assert snapshot(out.tree) == snapshot(env.src)


def test_unchanged_file_damaged_on_disk_is_resent(env: Env) -> None:
    put(env.src, "a", b"AAAA")
    put(env.src, "b", b"BBBB")
    first = env.sync()
    os.unlink(first.tree / "a")
    (first.tree / "b").write_bytes(b"B")
    out = env.sync()
    assert out.wanted == ["a", "b"]
    assert snapshot(out.tree) == snapshot(env.src)


# --- hostile lists ----------------------------------------------------------------


def _base_stats(src: Path) -> list[FileStat]:
    put(src, "file", b"content")
    put(src, "dir/inner", b"inner")
    os.symlink("/", src / "link")
    settle_dirs(src)
    return scan(src, None)


def _f(path: str, size: int = 1, mode: int = stat.S_IFREG | 0o644) -> FileStat:
    return FileStat(path=path, mode=mode, size=size, mtime_ns=T0, uid=0, gid=0)


HOSTILE = {
    "dotdot": [_f("../sentinel/keep")],
    "dotdot-inside": [_f("dir/../../sentinel/keep")],
    "absolute": [_f("/tmp/evil")],
    "double-slash": [_f("dir//x")],
    "trailing-slash": [_f("dir/x/")],
    "dot-prefix": [_f("./x")],
    "dot-inside": [_f("dir/./x")],
    "dot": [_f(".", mode=stat.S_IFDIR | 0o755)],
    "empty": [_f("")],
    "nul": [_f("a\x00b")],
    "too-long": [_f("a" * 256)],
    "duplicate": [_f("file")],
    "under-symlink": [_f("link/etc/passwd")],
    "under-symlink-dir": [FileStat("link/x", stat.S_IFDIR | 0o755, 0, T0, 0, 0)],
    "parent-missing": [_f("nodir/x")],
    "parent-is-file": [_f("file/x")],
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_list_is_refused_and_changes_nothing(env: Env, kind: str) -> None:
    good = _base_stats(env.src)
    key = "hostile"
    with env.store.begin(key, good) as t:
        send(t, env.src, good)
        tree = t.finish()
    before = snapshot(env.store_root)
    bad = HOSTILE[kind]
    with pytest.raises(UnsafePathError) as err:
        env.store.begin(key, [*good, *bad])
    assert repr(bad[0].path) in str(err.value)
    assert snapshot(env.store_root) == before
    # the previous copy still serves: nothing to resend
    with env.store.begin(key, good) as t:
        assert t.wanted == []
        assert t.finish() == tree
    # and the refused begin left the key unlocked
    t2 = env.store.try_begin(key, good)
    assert t2 is not None
    t2.close()


@pytest.mark.parametrize(
    "entry",
    [
        FileStat("fifo", stat.S_IFIFO | 0o644, 0, T0, 0, 0),
        FileStat("dev", stat.S_IFCHR | 0o644, 0, T0, 0, 0),
        FileStat("badmode", stat.S_IFREG | 0o17777, 0, T0, 0, 0),
        FileStat("neg", stat.S_IFREG | 0o644, -1, T0, 0, 0),
        FileStat("uid", stat.S_IFREG | 0o644, 0, T0, -1, 0),
        FileStat("nolink", stat.S_IFLNK | 0o777, 0, T0, 0, 0),
        FileStat("notalink", stat.S_IFREG | 0o644, 0, T0, 0, 0, linkname="/etc"),
    ],
    ids=lambda e: e.path,
)
def test_bad_entry_fields_are_refused(env: Env, entry: FileStat) -> None:
    with pytest.raises(UserError, match=repr(entry.path)):
        env.store.begin("k", [entry])
    assert list(env.store_root.iterdir()) == []


def test_from_json_checks_types() -> None:
    good = _f("a/b", size=3)
    assert FileStat.from_json(good.to_json()) == good
    link = FileStat("l", stat.S_IFLNK | 0o777, 0, T0, 1, 2, linkname="../x")
    assert FileStat.from_json(link.to_json()) == link
    for field, value in [("size", True), ("mode", "420"), ("path", 3), ("linkname", None)]:
        with pytest.raises(UserError, match=field):
            FileStat.from_json({**good.to_json(), field: value})
    d = good.to_json()
    del d["mtime_ns"]
    with pytest.raises(UserError, match="mtime_ns"):
        FileStat.from_json(d)


# --- misuse and failures ------------------------------------------------------------


def test_write_refuses_unwanted_paths_and_extra_bytes(env: Env) -> None:
    stats = _base_stats(env.src)
    with env.store.begin("k", stats) as t:
        with pytest.raises(UserError, match="not asked for"):
            t.write("dir", b"x")
        with pytest.raises(UserError, match="more than the 7 bytes"):
            t.write("file", b"12345678")
        t.write("file", b"1234")
        with pytest.raises(UserError, match="more than the 7 bytes"):
            t.write("file", b"5678")
        with pytest.raises(UserError, match=r"incomplete.*'dir/inner'"):
            t.finish()
    with env.store.begin("k", stats) as t:
        assert t.bytes_received == 0
        send(t, env.src, stats)
        t.finish()
        with pytest.raises(UserError, match="closed"):
            t.write("file", b"x")
        with pytest.raises(UserError, match="closed"):
            t.finish()


def test_aborted_transfer_keeps_the_previous_copy(env: Env) -> None:
    put(env.src, "a", b"old a")
    put(env.src, "b", b"old b")
    first = env.sync()
    before = snapshot(first.tree)
    put(env.src, "a", b"new a, longer", mtime=T0 + 1)
    os.unlink(env.src / "b")
    settle_dirs(env.src)
    stats = scan(env.src, None)
    with env.store.begin("host:/ctx:Dockerfile", stats) as t:
        assert t.wanted == ["a"]
        t.write("a", b"new")
    # the client went away before finish
    assert snapshot(first.tree) == before
    assert not any(p.name.endswith(".incoming") for p in env.store_root.iterdir())
    out = env.sync()
    assert out.wanted == ["a"]
    assert snapshot(out.tree) == snapshot(env.src)


def test_failure_while_applying_marks_the_copy_dirty(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(6):
        put(env.src, f"f{i}", b"v1 %d" % i)
    env.sync()
    for i in range(6):
        put(env.src, f"f{i}", b"version 2 %d" % i, mtime=T0 + 1)
    settle_dirs(env.src)
    real_place = Transfer._place
    placed: list[str] = []

    def flaky(self: Transfer, pfd: int, base: str, st: FileStat) -> None:
        if len(placed) == 3:
            raise OSError(28, "No space left on device")
        placed.append(st.path)
        real_place(self, pfd, base, st)

    monkeypatch.setattr(Transfer, "_place", flaky)
    stats = scan(env.src, None)
    with env.store.begin("host:/ctx:Dockerfile", stats) as t, pytest.raises(HostError):
        send(t, env.src, stats)
        t.finish()
    monkeypatch.setattr(Transfer, "_place", real_place)
    # half the new files are in place: the next sync trusts nothing and resends all
    out = env.sync()
    assert out.wanted == regular(stats)
    assert snapshot(out.tree) == snapshot(env.src)


# --- client side ------------------------------------------------------------------


def test_scan_skips_fifos_and_sockets(env: Env, tmp_path: Path) -> None:
    put(env.src, "f")
    os.mkfifo(env.src / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(env.src / "sock"))
        assert [s.path for s in scan(env.src, None)] == ["f"]
    finally:
        sock.close()


def test_read_chunks_refuses_links_and_special_files(env: Env) -> None:
    put(env.src, "dir/f", b"0123456789")
    os.symlink("dir/f", env.src / "link")
    os.symlink("dir", env.src / "dlink")
    os.mkfifo(env.src / "fifo")
    assert b"".join(read_chunks(env.src, "dir/f", chunk=3)) == b"0123456789"
    assert list(read_chunks(env.src, "dir/f", chunk=4)) == [b"0123", b"4567", b"89"]
    with pytest.raises(UnsafePathError):
        list(read_chunks(env.src, "link"))
    with pytest.raises(UnsafePathError):
        list(read_chunks(env.src, "dlink/f"))
    with pytest.raises(UnsafePathError):
        list(read_chunks(env.src, "../sentinel/keep"))
    with pytest.raises(UserError, match="not a regular file"):
        list(read_chunks(env.src, "fifo"))
    with pytest.raises(UserError, match="not a regular file"):
        list(read_chunks(env.src, "dir"))
    with pytest.raises(UserError, match="grew"):
        list(read_chunks(env.src, "dir/f", size=5))
    with pytest.raises(UserError, match="shrank"):
        list(read_chunks(env.src, "dir/f", size=15))


# --- concurrency ------------------------------------------------------------------


def _waiting_on(lock: Path) -> bool:
    """A blocked flock request on ``lock`` is listed in /proc/locks with "->"."""
    ino = os.stat(lock).st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return any("->" in line and f":{ino} " in line for line in lines)


def test_same_key_serializes_and_second_sees_first_result(env: Env) -> None:
    put(env.src, "a", b"a")
    settle_dirs(env.src)
    stats = scan(env.src, None)
    key = "shared"
    order: list[str] = []
    second: dict[str, list[str]] = {}

    def other() -> None:
        with env.store.begin(key, stats) as t:
            order.append("second begun")
            second["wanted"] = list(t.wanted)
            t.finish()

    with env.store.begin(key, stats) as first:
        assert env.store.try_begin(key, stats) is None
        th = threading.Thread(target=other)
        th.start()
        lock = env.store.paths(key).lock
        while not _waiting_on(lock):  # an event, not a delay: the kernel lists the waiter
            assert th.is_alive()
            time.sleep(0.01)
        send(first, env.src, stats)
        first.finish()
        order.append("first done")
    th.join(timeout=60)
    assert not th.is_alive()
    assert order == ["first done", "second begun"]
    # it waited for the first sync, so it found its result complete
    assert second["wanted"] == []


def test_different_keys_do_not_wait(env: Env) -> None:
    put(env.src, "a", b"a")
    stats = scan(env.src, None)
    got: list[Transfer] = []
    with env.store.begin("one", stats):
        th = threading.Thread(target=lambda: got.append(env.store.begin("two", stats)))
        th.start()
        th.join(timeout=60)
        assert not th.is_alive() and len(got) == 1  # it returned while "one" was held
        got[0].close()


async def test_abegin_waits_without_blocking_the_loop_and_releases_on_cancel(env: Env) -> None:
    put(env.src, "a", b"a")
    stats = scan(env.src, None)
    lock = env.store.paths("k").lock
    first = await env.store.abegin("k", stats)
    waiter = asyncio.create_task(env.store.abegin("k", stats))
    while not _waiting_on(lock):
        await asyncio.sleep(0.01)  # the loop keeps running while the thread waits
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    first.close()
    # The cancelled waiter's thread gets the lock (before or after this next one)
    # and must give it back: the key ends up free, not held by nobody's Transfer.
    again = await env.store.abegin("k", stats)
    again.close()
    last = None
    for _ in range(3000):  # a guard against a hang, not a timing assertion
        last = env.store.try_begin("k", stats)
        if last is not None:
            break
        await asyncio.sleep(0.01)
    assert last is not None, "the cancelled waiter kept the lock"
    last.close()


async def test_abegin_takes_a_spare_copy_of_a_busy_key(env: Env) -> None:
    put(env.src, "a", b"a")
    stats = scan(env.src, None)
    first = await env.store.abegin("k", stats, spare_copies=1)
    second = await env.store.abegin("k", stats, spare_copies=1)  # no wait: a spare copy
    assert first.wanted == second.wanted == ["a"]  # a fresh copy is sent everything
    lock = env.store.paths("k").lock
    third = asyncio.create_task(env.store.abegin("k", stats, spare_copies=1))
    while not _waiting_on(lock):  # both copies busy: it waits for the key itself
        await asyncio.sleep(0.01)
    first.close()
    (await third).close()
    second.close()


async def test_waiting_for_a_busy_key_takes_no_executor_thread(env: Env) -> None:
    # Builds queued on one busy context must not take the loop's executor: the
    # build holding the key needs it (to_thread) to get to the point where it
    # lets go. One executor thread makes the starvation certain.
    from concurrent.futures import ThreadPoolExecutor

    put(env.src, "a", b"a")
    stats = scan(env.src, None)
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    held = await env.store.abegin("k", stats)
    waiters = [asyncio.create_task(env.store.abegin("k", stats)) for _ in range(3)]
    lock = env.store.paths("k").lock
    while not _waiting_on(lock):
        await asyncio.sleep(0.01)
    # the holder's own work in the executor goes on (a guard against a hang, not a timing)
    assert await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), 60) == "ran"
    held.close()
    # in the order they get the key, which the kernel does not promise to be the
    # order they asked in: awaiting them in list order hung when a later waiter
    # won (it held the key until the earlier one, waiting for it, returned)
    async with asyncio.timeout(60):  # a guard against a hang, not a timing
        for w in asyncio.as_completed(waiters):
            (await w).close()
    pool.shutdown()


def test_unclosed_transfer_warns(env: Env) -> None:
    put(env.src, "a", b"a")
    t: Transfer | None = env.store.begin("k", scan(env.src, None))
    with pytest.warns(ResourceWarning, match="never closed"):
        del t
    other = env.store.try_begin("k", [])
    assert other is not None
    other.close()


def test_writes_never_follow_links_even_without_validation(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # defence in depth: were a "through a symlink" entry ever let in, the O_NOFOLLOW
    # descriptor walk still refuses to go through the link
    monkeypatch.setattr(filesync, "_validate", lambda stats: {s.path: s for s in stats})
    link = FileStat("link", stat.S_IFLNK | 0o777, 0, T0, 0, 0, linkname=str(env.sentinel))
    stats = [link, FileStat("link/sub", stat.S_IFDIR | 0o755, 0, T0, 0, 0), _f("link/keep", 4)]
    with env.store.begin("k", stats) as t:
        t.write("link/keep", b"evil")
        with pytest.raises(HostError):
            t.finish()


def test_read_only_dirs_can_be_refilled_and_removed(env: Env) -> None:
    put(env.src, "ro/a", b"a")
    put(env.src, "ro/deep/b", b"b")
    (env.src / "ro/deep").chmod(0o500)
    (env.src / "ro").chmod(0o555)
    put(env.src, "gone/c", b"c")
    (env.src / "gone").chmod(0o500)
    env.sync()
    (env.src / "ro").chmod(0o755)
    put(env.src, "ro/new", b"new")
    (env.src / "ro").chmod(0o555)
    (env.src / "gone").chmod(0o700)
    (env.src / "gone/c").unlink()
    (env.src / "gone").rmdir()
    out = env.sync()
    assert out.wanted == ["ro/new"]
    assert snapshot(out.tree) == snapshot(env.src)


def test_chunks_of_different_files_may_interleave(env: Env) -> None:
    put(env.src, "a", b"aaaaaa")
    put(env.src, "b", b"bbbbbb")
    settle_dirs(env.src)
    stats = scan(env.src, None)
    with env.store.begin("k", stats) as t:
        for i in range(0, 6, 2):
            t.write("a", b"aaaaaa"[i : i + 2])
            t.write("b", b"bbbbbb"[i : i + 2])
        tree = t.finish()
        assert t.bytes_received == 12
        assert snapshot(tree) == snapshot(env.src)
