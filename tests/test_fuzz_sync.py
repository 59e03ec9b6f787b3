"""Property tests for the context sync (session/filesync.py, api/session.py).

* Random trees and random edits: after every sync round the worker's copy is
  the source tree entry for entry (type, mode, size, mtime, owner, content or
  link target), read from the disk on both sides, never from the engine.
* Random and hostile client answers (stat batches of malformed or hostile JSON,
  file chunks for paths never asked for, too many bytes, errors, a stream that
  ends) fed to the worker's session end: the sync either succeeds with a tree
  that matches what was announced, or fails with our error; never another
  exception, never a write outside the store, and a failed sync leaves the
  key's previous copy as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ociworker.api.session import WorkerSession
from ociworker.api.v1 import control_pb2 as pb
from ociworker.errors import OciworkerError
from ociworker.session.filesync import ContextStore, read_chunks, scan

pytestmark = pytest.mark.stress

ROOT = os.geteuid() == 0


@dataclass(frozen=True)
class Entry:
    kind: str  # "file" | "dir" | "sym"
    mode: int = 0o644
    mtime_ns: int = 0
    data: bytes = b""
    target: str = ""
    uid: int = 0


Model = dict[str, Entry]
NAMES = st.sampled_from(["a", "b", "c", "sub", "x y", "é", ".hidden", "Dockerfile"])


class Clock:
    """Strictly increasing mtimes: an edit always moves a file's mtime, as a
    real edit does (the sync, like buildx's, does not hash content)."""

    def __init__(self) -> None:
        self.now = 1_600_000_000_000_000_007

    def tick(self) -> int:
        self.now += 1_000_000_123
        return self.now


def _below(model: Model, path: str) -> list[str]:
    return [p for p in model if p == path or p.startswith(path + "/")]


@st.composite
def edit(draw: st.DrawFn, model: Model, clock: Clock) -> Model:
    out = dict(model)
    dirs = [""] + [p for p, e in out.items() if e.kind == "dir"]
    op = draw(st.sampled_from(["add", "add", "rewrite", "delete", "chmod", "retype", "owner"]))
    existing = sorted(out)
    if op == "add" or not existing:
        path = posixpath.join(draw(st.sampled_from(dirs)), draw(NAMES))
        for p in _below(out, path):
            del out[p]
        kind = draw(st.sampled_from(["file", "file", "dir", "sym"]))
    else:
        path = draw(st.sampled_from(existing))
        kind = out[path].kind
    if op == "delete" and existing:
        for p in _below(out, path):
            del out[p]
        return out
    if op == "chmod" and existing:
        bits = 0o777 if kind != "dir" else 0o755  # a dir the client could not list is not sent
        out[path] = replace(out[path], mode=draw(st.integers(0, 0o7777)) | (bits & 0o500))
        return out
    if op == "owner" and existing:
        out[path] = replace(out[path], uid=draw(st.integers(0, 70_000)))
        return out
    if op == "retype" and existing:
        for p in _below(out, path):
            del out[p]
        kind = draw(st.sampled_from(["file", "dir", "sym"]))
    now = clock.tick()
    if kind == "file":
        data = draw(st.binary(max_size=600))
        out[path] = Entry("file", draw(st.sampled_from([0o644, 0o600, 0o755, 0o4755])), now, data)
    elif kind == "dir":
        out[path] = Entry("dir", draw(st.sampled_from([0o755, 0o700, 0o555])), now)
    else:
        target = draw(st.sampled_from(["a", "../../etc", "/etc/passwd", "sub/b", "x y"]))
        out[path] = Entry("sym", 0o777, now, target=target)
    return out


@st.composite
def histories(draw: st.DrawFn) -> list[Model]:
    clock = Clock()
    model: Model = {}
    rounds: list[Model] = []
    for _ in range(draw(st.integers(1, 4))):
        for _ in range(draw(st.integers(1, 8))):
            model = draw(edit(model, clock))
        rounds.append(model)
    return rounds


def _unlock(path: str) -> None:
    if not os.path.islink(path):  # os.walk lists a link to a dir among the dirs
        os.chmod(path, 0o755)


def materialize(src: Path, model: Model) -> None:
    """The source dir as ``model`` says, rebuilt from scratch (the worker only
    ever sees the stats and content, so rebuilding equals editing in place)."""
    if src.exists():
        for dirpath, dirnames, _ in os.walk(src):
            for d in dirnames:
                _unlock(os.path.join(dirpath, d))
        shutil.rmtree(src)
    src.mkdir()
    for path in sorted(model):
        e = model[path]
        full = src / path
        if e.kind == "dir":
            full.mkdir()
        elif e.kind == "sym":
            os.symlink(e.target, full)
        else:
            full.write_bytes(e.data)
            os.chmod(full, e.mode)
        if ROOT:
            os.lchown(full, e.uid, e.uid)
    for path in sorted(model, key=lambda p: -p.count("/")):
        e = model[path]
        full = src / path
        if e.kind == "dir":
            os.chmod(full, e.mode)
        os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    os.utime(src, ns=(1, 1))


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            body: object = None
            if stat.S_ISREG(st_.st_mode):
                body = Path(p).read_bytes()
            elif stat.S_ISLNK(st_.st_mode):
                body = os.readlink(p)
            owner = (st_.st_uid, st_.st_gid) if ROOT else None
            mode = st_.st_mode if not stat.S_ISLNK(st_.st_mode) else stat.S_IFLNK
            out[os.path.relpath(p, root)] = (mode, st_.st_size if body else 0,
                                             st_.st_mtime_ns, owner, body)  # fmt: skip
    return out


@contextlib.contextmanager
def scratch() -> Iterator[tuple[Path, ContextStore]]:
    """(source dir, store) in a scratch dir, with a sentinel beside them that
    must not change."""
    with tempfile.TemporaryDirectory(prefix="fuzz-sync-") as tmp:
        base = Path(tmp)
        sentinel = base / "sentinel"
        (sentinel / "sub").mkdir(parents=True)
        (sentinel / "keep").write_bytes(b"sentinel")
        before = snapshot(sentinel)
        try:
            yield base / "src", ContextStore(base / "contexts")
        finally:
            assert snapshot(sentinel) == before, "something wrote outside the store"
            for dirpath, dirnames, _ in os.walk(base):
                for d in dirnames:  # let cleanup into 0o555 dirs also work unprivileged
                    _unlock(os.path.join(dirpath, d))


def sync_once(store: ContextStore, src: Path, key: str) -> Path:
    stats = scan(src)
    sizes = {s.path: s.size for s in stats}
    with store.begin(key, stats) as t:
        for path in t.wanted:
            for chunk in read_chunks(src, path, chunk=97, size=sizes[path]):
                t.write(path, chunk)
        return t.finish()


@given(histories())
def test_the_synced_tree_follows_every_edit(rounds: list[Model]) -> None:
    with scratch() as (src, store):
        for model in rounds:
            materialize(src, model)
            tree = sync_once(store, src, "key")
            assert snapshot(tree) == snapshot(src)


# --- hostile answers to the worker's requests -----------------------------------

GOOD = [
    {"path": "a", "mode": stat.S_IFREG | 0o644, "size": 3, "mtime_ns": 5, "uid": 0, "gid": 0},
    {"path": "d", "mode": stat.S_IFDIR | 0o755, "size": 0, "mtime_ns": 5, "uid": 0, "gid": 0},
    {"path": "d/f", "mode": stat.S_IFREG | 0o600, "size": 2, "mtime_ns": 7, "uid": 0, "gid": 0},
    {"path": "l", "mode": stat.S_IFLNK | 0o777, "size": 0, "mtime_ns": 5, "uid": 0, "gid": 0,
     "linkname": "/etc/passwd"},
]  # fmt: skip
BAD_JSON: list[bytes] = [
    b"", b"{", b"null", b"[]", b"7", b'"a"', b"\xff\xfe", b"[" * 5000 + b"]" * 5000,
    b"1" * 5000, b'{"path": 1}', b'{"path": "a", "mode": true}',
]  # fmt: skip
HOSTILE_PATHS = ["../x", "/etc/passwd", "a/../../x", "l/x", "a/x", "d/../d", ".", "", "x\x00y",
                 "d//f", "n" * 300, "d/sub/deeper"]  # fmt: skip


@st.composite
def stat_json(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["good", "good", "hostile", "bad"]))
    if kind == "bad":
        return draw(st.sampled_from(BAD_JSON))
    entry = dict(draw(st.sampled_from(GOOD)))
    if kind == "hostile":
        field = draw(st.sampled_from(["path", "mode", "size", "mtime_ns", "uid", "linkname"]))
        entry[field] = draw(
            {
                "path": st.sampled_from(HOSTILE_PATHS),
                "mode": st.sampled_from([stat.S_IFCHR | 0o666, stat.S_IFIFO, 0o644, -1, 1 << 40]),
                "size": st.sampled_from([-1, 1 << 63, 1 << 70]),
                "mtime_ns": st.sampled_from([-(1 << 64), 1 << 64, 1.5]),
                "uid": st.sampled_from([-1, 1 << 32, "0"]),
                "linkname": st.sampled_from(["", "x\x00", "t" * 5000, "ok"]),
            }[field]
        )
    return json.dumps(entry).encode()


@st.composite
def answers(draw: st.DrawFn) -> tuple[list[pb.SessionMessage], list[pb.SessionMessage]]:
    """(answers to the stat request, answers to the files request); each list
    ends the way a client can end it: done, an error, or a closed stream
    (an empty SessionMessage here stands for the stream's end)."""
    stat_msgs = [
        pb.SessionMessage(
            stat_batch=pb.StatBatch(stats_json=draw(st.lists(stat_json(), max_size=5)))
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    file_msgs = []
    for _ in range(draw(st.integers(0, 6))):
        path = draw(st.sampled_from(["a", "d/f", "d", "l", "never", "../a", ""]))
        data = draw(st.binary(max_size=4))
        file_msgs.append(pb.SessionMessage(file_chunk=pb.FileChunk(path=path, data=data)))
    ends = [
        pb.SessionMessage(stat_batch=pb.StatBatch(done=True)),
        pb.SessionMessage(error=pb.SessionError(message="client gave up")),
        pb.SessionMessage(),
    ]
    stat_msgs.append(draw(st.sampled_from(ends)))
    file_msgs.append(
        draw(st.sampled_from([pb.SessionMessage(file_chunk=pb.FileChunk(done=True)), *ends[1:]]))
    )
    return stat_msgs, file_msgs


def _batch(entry: dict[str, object]) -> pb.SessionMessage:
    return pb.SessionMessage(
        stat_batch=pb.StatBatch(stats_json=[json.dumps(entry).encode()], done=True)
    )


async def _sync_through_session(
    store: ContextStore, script: tuple[list[pb.SessionMessage], list[pb.SessionMessage]]
) -> Path:
    session: WorkerSession
    replies = {"stat_request": list(script[0]), "files_request": list(script[1])}

    def send(msg: pb.SessionMessage) -> None:
        # the client "answers" each request with its scripted messages
        for answer in replies.pop(msg.WhichOneof("msg") or "", []):
            if answer.WhichOneof("msg") is None:
                asyncio.get_running_loop().call_soon(session.close)
                return
            answer = pb.SessionMessage(id=msg.id, **{
                answer.WhichOneof("msg"): getattr(answer, answer.WhichOneof("msg"))
            })  # fmt: skip
            session.dispatch(answer)

    session = WorkerSession(pb.SessionHello(session_id="s", dirs=["context"]), send)
    stats = await session.stat("context")
    with await store.abegin("key", stats) as transfer:
        await session.fetch("context", transfer)
        return await asyncio.to_thread(transfer.finish)


# found by this test: json.loads raised RecursionError on a deeply nested stat
# and S_IFMT raised OverflowError on a negative or huge mode, both past the
# worker's checks as tracebacks instead of a refused sync
@example(([pb.SessionMessage(stat_batch=pb.StatBatch(stats_json=[BAD_JSON[7]]))], []))
@example(([_batch({**GOOD[0], "mode": -1})], []))
@example(([_batch({**GOOD[0], "mode": 1 << 40})], []))
@given(answers())
def test_hostile_answers_are_refused_cleanly(
    script: tuple[list[pb.SessionMessage], list[pb.SessionMessage]],
) -> None:
    with scratch() as (src, store):
        materialize(src, {"old": Entry("file", 0o644, 9, b"previous copy")})
        before = snapshot(sync_once(store, src, "key"))
        try:
            tree = asyncio.run(_sync_through_session(store, script))
        except OciworkerError:
            # refused: the previous copy still serves the next build
            assert snapshot(store.paths("key").tree) == before
            return
        # accepted: the tree is what the client announced, nothing else
        announced = {}
        for msg in script[0]:
            for raw in msg.stat_batch.stats_json:
                d = json.loads(raw)
                announced[d["path"]] = d
        got = snapshot(tree)
        assert set(got) == set(announced)
        for path, (mode, size, _, _, _) in got.items():
            want = announced[path]
            assert stat.S_IFMT(mode) == stat.S_IFMT(want["mode"]), path
            if stat.S_ISREG(mode):
                assert (mode, size) == (want["mode"], want["size"]), path
