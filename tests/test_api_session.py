"""The session stream over a real gRPC channel (a unix socket in tmp): context sync
is incremental, keeps symlinks, applies the client's ignore rules, and the worker
refuses names that leave the context; secrets flow on request only."""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from ociworker.api import session as session_mod
from ociworker.api.server import serve_session
from ociworker.api.session import ClientSession, SessionHub, WorkerSession
from ociworker.api.v1 import control_pb2 as pb
from ociworker.api.v1 import control_pb2_grpc as pb_grpc
from ociworker.errors import UnsafePathError, UserError
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.session import filesync


class _SessionOnly(pb_grpc.ControlServicer):
    def __init__(self, hub: SessionHub) -> None:
        self.hub = hub

    async def Session(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        await serve_session(self.hub, context)


class _Secrets:
    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values
        self.asked: list[str] = []

    async def get_secret(self, secret_id: str) -> bytes | None:
        self.asked.append(secret_id)
        return self.values.get(secret_id)


@dataclass
class Link:
    hub: SessionHub
    open: Callable[[ClientSession], Any]


@pytest.fixture
async def link(tmp_path: Path) -> AsyncIterator[Link]:
    hub = SessionHub()
    server = grpc.aio.server()
    pb_grpc.add_ControlServicer_to_server(_SessionOnly(hub), server)
    addr = f"unix://{tmp_path}/s.sock"
    server.add_insecure_port(addr)
    await server.start()
    channel = grpc.aio.insecure_channel(addr)
    stub = pb_grpc.ControlStub(channel)
    tasks: list[asyncio.Task[None]] = []
    calls: list[Any] = []

    async def open_session(cs: ClientSession) -> WorkerSession:
        call = stub.Session()
        calls.append(call)
        await call.write(cs.hello())
        assert isinstance(await call.read(), pb.SessionMessage)
        tasks.append(asyncio.create_task(cs.serve(call, grpc.aio.EOF)))
        return hub.get(cs.id)

    yield Link(hub, open_session)
    for t in tasks:
        t.cancel()
    for c in calls:
        c.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    await server.stop(None)


def _context(root: Path) -> Path:
    ctx = root / "ctx"
    (ctx / "sub").mkdir(parents=True)
    for i in range(20):
        (ctx / "sub" / f"f{i}").write_bytes(os.urandom(1000 + i))
    (ctx / "big").write_bytes(os.urandom(300_000))
    (ctx / "ignored.log").write_text("secret-ish\n")
    (ctx / "link").symlink_to("/etc/passwd")
    (ctx / "empty").write_bytes(b"")
    return ctx


async def _sync(ws: WorkerSession, store: filesync.ContextStore, key: str) -> tuple[Path, int]:
    stats = await ws.stat("context")
    with store.begin(key, stats) as transfer:
        await ws.fetch("context", transfer)
        return transfer.finish(), transfer.bytes_received


async def test_sync_is_incremental_and_keeps_symlinks(link: Link, tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    matcher = IgnoreMatcher(["*.log"])
    cs = ClientSession(uuid.uuid4().hex, {"context": (ctx, matcher)})
    ws = await link.open(cs)
    store = filesync.ContextStore(tmp_path / "store")

    dest, first = await _sync(ws, store, "k")
    total = sum(p.stat().st_size for p in ctx.rglob("*") if p.is_file() and not p.is_symlink())
    assert first == total - len("secret-ish\n") == cs.bytes_sent
    assert not (dest / "ignored.log").exists()
    assert os.readlink(dest / "link") == "/etc/passwd"  # sent as a link, not followed
    assert (dest / "big").read_bytes() == (ctx / "big").read_bytes()
    assert (dest / "empty").read_bytes() == b""

    (ctx / "sub" / "f3").write_bytes(b"changed")
    (ctx / "sub" / "f4").unlink()
    dest2, second = await _sync(ws, store, "k")
    assert second == len(b"changed")
    assert (dest2 / "sub" / "f3").read_bytes() == b"changed"
    assert not (dest2 / "sub" / "f4").exists()
    assert (dest2 / "big").read_bytes() == (ctx / "big").read_bytes()


async def test_files_larger_than_a_batch_and_many_small_ones_arrive_whole(
    link: Link, tmp_path: Path
) -> None:
    # the client reads and the worker writes in batches (of at most _BATCH_BYTES
    # or _BATCH_CHUNKS chunks); files spanning batches, and more small files than
    # one batch holds, must come out as the source has them
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    rng = random.Random(7)
    want: dict[str, bytes] = {}
    sizes = [session_mod._BATCH_BYTES * 2 + 5, session_mod._CHUNK - 1, 0, 1]
    sizes += [rng.randrange(1, 3000) for _ in range(3 * session_mod._BATCH_CHUNKS)]
    for i, size in enumerate(sizes):
        want[f"f{i:04d}"] = rng.randbytes(size)
        (ctx / f"f{i:04d}").write_bytes(want[f"f{i:04d}"])
    cs = ClientSession(uuid.uuid4().hex, {"context": (ctx, None)})
    ws = await link.open(cs)
    dest, received = await _sync(ws, filesync.ContextStore(tmp_path / "store"), "k")
    assert received == cs.bytes_sent == sum(sizes)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == want


class _LyingClient(ClientSession):
    """Serves a stat list naming a path outside the context."""

    async def _stat(self, rid: int, name: str) -> None:
        bad = filesync.FileStat("../escape", 0o100644, 3, 0, 0, 0)
        raw = [json.dumps(bad.to_json()).encode()]
        await self._put(id=rid, stat_batch=pb.StatBatch(stats_json=raw, done=True))


async def test_worker_rejects_names_leaving_the_context(link: Link, tmp_path: Path) -> None:
    cs = _LyingClient(uuid.uuid4().hex, {"context": (tmp_path, None)})
    ws = await link.open(cs)
    stats = await ws.stat("context")
    with pytest.raises(UnsafePathError):
        filesync.ContextStore(tmp_path / "store").begin("k", stats)
    assert not (tmp_path / "store" / "escape").exists()


async def test_worker_rejects_files_it_did_not_ask_for(link: Link, tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    cs = ClientSession(uuid.uuid4().hex, {"context": (ctx, None)})
    ws = await link.open(cs)

    class OnlyBig:
        wanted = ["big"]

        def write(self, path: str, chunk: bytes) -> None:
            raise AssertionError("not reached")

    # the client answers with "sub/f0" though the worker asked for "big"
    orig = cs._files

    async def swap(rid: int, name: str, paths: list[str]) -> None:
        await orig(rid, name, ["sub/f0"])

    cs._files = swap  # type: ignore[method-assign]
    with pytest.raises(UnsafePathError):
        await ws.fetch("context", OnlyBig())


async def test_secrets_are_asked_only_when_offered(link: Link, tmp_path: Path) -> None:
    secrets = _Secrets({"tok": b"s3cr3t"})
    cs = ClientSession(uuid.uuid4().hex, {}, secrets=secrets, secret_ids=["tok", "gone"])
    ws = await link.open(cs)
    assert await ws.get_secret("tok") == b"s3cr3t"
    assert await ws.get_secret("gone") is None
    assert await ws.get_secret("never-offered") is None
    assert secrets.asked == ["tok", "gone"]


async def test_closed_session_fails_pending_requests(link: Link, tmp_path: Path) -> None:
    cs = ClientSession(uuid.uuid4().hex, {"context": (tmp_path, None)})
    ws = await link.open(cs)
    link.hub.remove(ws)
    from ociworker.api.session import SessionClosed

    with pytest.raises(SessionClosed):
        await ws.stat("context")


class _Echo:
    """A Duplex that answers every write with the same bytes (an 'agent')."""

    def __init__(self) -> None:
        self._q: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = False

    async def read(self, n: int) -> bytes:
        return await self._q.get()

    async def write(self, data: bytes) -> None:
        await self._q.put(data.upper())

    async def close(self) -> None:
        self.closed = True
        await self._q.put(b"")


class _Agents:
    def __init__(self) -> None:
        self.conns: list[_Echo] = []

    def has_agent(self, agent_id: str) -> bool:
        return agent_id == "default"

    async def connect_agent(self, agent_id: str) -> _Echo:
        self.conns.append(_Echo())
        return self.conns[-1]


async def test_ssh_connections_are_multiplexed_in_order(link: Link, tmp_path: Path) -> None:
    agents = _Agents()
    cs = ClientSession(uuid.uuid4().hex, {}, ssh=agents, ssh_ids=["default"])
    ws = await link.open(cs)
    assert ws.has_agent("default") and not ws.has_agent("other")
    a = await ws.connect_agent("default")
    b = await ws.connect_agent("default")
    for i in range(20):
        await a.write(f"a{i};".encode())
        await b.write(f"b{i};".encode())
    got_a = got_b = b""
    while len(got_a) < len(b"".join(f"A{i};".encode() for i in range(20))):
        got_a += await a.read(1000)
    while len(got_b) < len(b"".join(f"B{i};".encode() for i in range(20))):
        got_b += await b.read(1000)
    assert got_a == b"".join(f"A{i};".encode() for i in range(20))
    assert got_b == b"".join(f"B{i};".encode() for i in range(20))
    await a.close()
    await b.close()
    with pytest.raises(LookupError):
        await ws.connect_agent("other")


async def test_registry_credentials_come_from_the_client(link: Link, tmp_path: Path) -> None:
    class Creds:
        async def credentials(self, host: str) -> tuple[str, str] | None:
            return ("user", "tok") if host == "reg.example" else None

    cs = ClientSession(uuid.uuid4().hex, {}, credentials=Creds())
    ws = await link.open(cs)
    assert await ws.credentials("reg.example") == ("user", "tok")
    assert await ws.credentials("other.example") is None


class _SlowAgents(_Agents):
    """Connecting takes a while, as a real agent's socket does: the worker's first
    bytes (sent right after the open, as ssh does) arrive before the connection."""

    async def connect_agent(self, agent_id: str) -> _Echo:
        await asyncio.sleep(0.05)
        return await super().connect_agent(agent_id)


async def test_bytes_sent_before_the_agent_connects_are_delivered(
    link: Link, tmp_path: Path
) -> None:
    agents = _SlowAgents()
    cs = ClientSession(uuid.uuid4().hex, {}, ssh=agents, ssh_ids=["default"])
    ws = await link.open(cs)
    conns = [await ws.connect_agent("default") for _ in range(5)]
    for i, c in enumerate(conns):
        await c.write(f"req{i}".encode())
    for i, c in enumerate(conns):
        want = f"REQ{i}".encode()
        got = b""
        while len(got) < len(want):
            got += await asyncio.wait_for(c.read(100), 10)
        assert got == want
        await c.close()


@pytest.fixture
def real_agent(tmp_path: Path) -> Any:
    import shutil
    import subprocess

    if shutil.which("ssh-agent") is None:
        pytest.fail("openssh-client is not installed: run scripts/setup-host")
    sock = tmp_path / "agent.sock"
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", "-q", str(key)], check=True, env=env)
        # the key's wire blob, from ssh-keygen's own public file
        import base64

        yield sock, base64.b64decode((tmp_path / "id.pub").read_text().split()[1])
    finally:
        agent.terminate()
        agent.wait()


async def test_a_real_agent_answers_through_the_session_every_time(
    link: Link, tmp_path: Path, real_agent: tuple[Path, bytes]
) -> None:
    """ssh opens the agent and writes its request at once; each of 30 connections
    must get the agent's identities answer naming the key (a dropped request stalls)."""
    from ociworker.session.sshagent import LocalSSHAgents, SSHSource

    sock, blob = real_agent
    agents = LocalSSHAgents([SSHSource("default", (str(sock),))])
    cs = ClientSession(uuid.uuid4().hex, {}, ssh=agents, ssh_ids=["default"])
    ws = await link.open(cs)
    request = (1).to_bytes(4, "big") + bytes([11])  # SSH_AGENTC_REQUEST_IDENTITIES
    for _ in range(30):
        c = await ws.connect_agent("default")
        await c.write(request)
        got = b""
        while len(got) < 4 or len(got) < 4 + int.from_bytes(got[:4], "big"):
            chunk = await asyncio.wait_for(c.read(65536), 10)
            assert chunk, "the agent connection closed without an answer"
            got += chunk
        assert got[4] == 12  # SSH_AGENT_IDENTITIES_ANSWER
        assert blob in got
        await c.close()


# --- a hostile client during context sync (issue 18 item 4) ---------------------------------


def _stat_json(st: filesync.FileStat) -> bytes:
    return json.dumps(st.to_json()).encode()


class _BatchingClient(ClientSession):
    """Answers a stat request with the given batches, as they are."""

    batches: list[list[filesync.FileStat]] = []

    async def _stat(self, rid: int, name: str) -> None:
        for i, batch in enumerate(self.batches):
            raw = [_stat_json(st) for st in batch]
            done = i == len(self.batches) - 1
            await self._put(id=rid, stat_batch=pb.StatBatch(stats_json=raw, done=done))


_T0 = 1_700_000_000 * 10**9


def _d(path: str) -> filesync.FileStat:
    return filesync.FileStat(path, 0o040755, 0, _T0, 0, 0)


def _f(path: str, size: int) -> filesync.FileStat:
    return filesync.FileStat(path, 0o100644, size, _T0, 0, 0)


async def test_a_path_listed_twice_in_two_batches_is_refused(link: Link, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a").write_bytes(b"abc")
    cs = _BatchingClient(uuid.uuid4().hex, {"context": (ctx, None)})
    cs.batches = [[_f("a", 3)], [_f("a", 3)]]
    ws = await link.open(cs)
    stats = await asyncio.wait_for(ws.stat("context"), 30)
    with pytest.raises(UnsafePathError, match="listed twice"):
        filesync.ContextStore(tmp_path / "store").begin("k", stats)
    assert not (tmp_path / "store" / "a").exists()


async def test_a_list_out_of_order_gives_the_listed_tree(link: Link, tmp_path: Path) -> None:
    # children before their dirs, across batches: the set is what counts (BuildKit's
    # fsutil refuses an unsorted stream; we sort, so the tree is the same either way)
    ctx = tmp_path / "ctx"
    (ctx / "d" / "e").mkdir(parents=True)
    (ctx / "d" / "e" / "x").write_bytes(b"xx")
    (ctx / "d" / "y").write_bytes(b"yyy")
    cs = _BatchingClient(uuid.uuid4().hex, {"context": (ctx, None)})
    cs.batches = [[_f("d/e/x", 2)], [_f("d/y", 3), _d("d/e")], [_d("d")]]
    ws = await link.open(cs)
    tree, got = await asyncio.wait_for(_sync(ws, filesync.ContextStore(tmp_path / "s"), "k"), 30)
    assert got == 5
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*")) == [
        "d", "d/e", "d/e/x", "d/y",
    ]  # fmt: skip
    assert (tree / "d" / "e" / "x").read_bytes() == b"xx"


class _OutOfTurnClient(ClientSession):
    """Answers a stat request with a file chunk."""

    async def _stat(self, rid: int, name: str) -> None:
        await self._put(id=rid, file_chunk=pb.FileChunk(path="a", data=b"zz"))


async def test_a_file_chunk_answering_a_stat_request_is_refused(link: Link, tmp_path: Path) -> None:
    cs = _OutOfTurnClient(uuid.uuid4().hex, {"context": (tmp_path, None)})
    ws = await link.open(cs)
    # before: read as an empty, unfinished batch, and waited past forever
    with pytest.raises(UserError, match="answered a stat request with file_chunk"):
        await asyncio.wait_for(ws.stat("context"), 30)


class _StatForFilesClient(ClientSession):
    async def _files(self, rid: int, name: str, paths: list[str]) -> None:
        await self._put(id=rid, stat_batch=pb.StatBatch(done=True))


async def test_a_stat_batch_answering_a_files_request_is_refused(
    link: Link, tmp_path: Path
) -> None:
    ctx = _context(tmp_path)
    cs = _StatForFilesClient(uuid.uuid4().hex, {"context": (ctx, None)})
    ws = await link.open(cs)
    stats = await ws.stat("context")
    with (
        filesync.ContextStore(tmp_path / "store").begin("k", stats) as transfer,
        pytest.raises(UserError, match="answered a files request with stat_batch"),
    ):
        await asyncio.wait_for(ws.fetch("context", transfer), 30)


class _TwiceClient(ClientSession):
    """Sends every wanted file's content twice."""

    async def _files(self, rid: int, name: str, paths: list[str]) -> None:
        root, _ = self._dir(name)
        for _ in range(2):
            for p in paths:
                data = (root / p).read_bytes()
                await self._put(id=rid, file_chunk=pb.FileChunk(path=p, data=data))
        await self._put(id=rid, file_chunk=pb.FileChunk(done=True))


async def test_a_file_sent_twice_is_refused_and_keeps_the_last_copy(
    link: Link, tmp_path: Path
) -> None:
    ctx = _context(tmp_path)
    store = filesync.ContextStore(tmp_path / "store")
    good = ClientSession(uuid.uuid4().hex, {"context": (ctx, None)})
    tree, _ = await _sync(await link.open(good), store, "k")
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file() and not p.is_symlink()}
    (ctx / "big").write_bytes(os.urandom(1000))
    cs = _TwiceClient(uuid.uuid4().hex, {"context": (ctx, None)})
    with pytest.raises(UserError, match="sent more than the 1000 bytes"):
        await asyncio.wait_for(_sync(await link.open(cs), store, "k"), 30)
    after = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before  # the aborted transfer left the previous copy


class _EarlyDoneClient(ClientSession):
    """Ends the files answer after the first wanted file."""

    async def _files(self, rid: int, name: str, paths: list[str]) -> None:
        root, _ = self._dir(name)
        p = paths[0]
        await self._put(id=rid, file_chunk=pb.FileChunk(path=p, data=(root / p).read_bytes()))
        await self._put(id=rid, file_chunk=pb.FileChunk(done=True))


async def test_a_files_answer_ended_early_is_refused(link: Link, tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    cs = _EarlyDoneClient(uuid.uuid4().hex, {"context": (ctx, None)})
    with pytest.raises(UserError, match="context sync incomplete"):
        await asyncio.wait_for(_sync(await link.open(cs), filesync.ContextStore(tmp_path), "k"), 30)
