"""The session stream: the client serves, the worker pulls.

One bidi ``Session`` call per client session. The worker sends requests (stat a
local dir, send files, a secret, registry credentials, open an ssh agent
connection), each with a fresh id; the client's answers carry that id, so any
number of requests (and ssh connections) share the stream. ``WorkerSession``
is the worker's end, ``ClientSession`` the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ociworker.api.v1 import control_pb2 as pb
from ociworker.core.session import Credentials, Duplex, Secrets, SSHAgents
from ociworker.errors import NotFoundError, UnsafePathError, UserError, WorldError
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.session import filesync

_STAT_BATCH = 500
_CHUNK = 256 * 1024  # file chunk per message (gRPC's default message limit is 4 MiB)
#: what one thread hop reads (client) or writes (worker) of a context sync at most
_BATCH_BYTES = 1 << 20
_BATCH_CHUNKS = 64
_CLOSED = pb.SessionMessage()  # sentinel put on every pending queue when the stream ends


class SessionClosed(WorldError):
    """The client's session stream ended while the worker still needed it."""

    code = "session_closed"


class _Transfer(Protocol):
    """The worker side of one filesync transfer (see session/filesync.py)."""

    @property
    def wanted(self) -> Sequence[str]: ...

    def write(self, path: str, chunk: bytes) -> None: ...


# --- worker side ----------------------------------------------------------------


class WorkerSession:
    """The worker's end of one client session."""

    def __init__(self, hello: pb.SessionHello, send: Callable[[pb.SessionMessage], None]) -> None:
        self.id = hello.session_id
        self.dirs = tuple(hello.dirs)
        self.secret_ids = frozenset(hello.secret_ids)
        self.ssh_ids = frozenset(hello.ssh_ids)
        self._send = send
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[pb.SessionMessage]] = {}
        self.closed = asyncio.Event()

    # called by the server for each message the client sends
    def dispatch(self, msg: pb.SessionMessage) -> None:
        q = self._pending.get(msg.id)
        if q is not None:
            q.put_nowait(msg)

    def close(self) -> None:
        self.closed.set()
        for q in self._pending.values():
            q.put_nowait(_CLOSED)

    @contextlib.contextmanager
    def _request(self, **kw: Any) -> Iterator[tuple[int, asyncio.Queue[pb.SessionMessage]]]:
        if self.closed.is_set():
            raise SessionClosed(f"session {self.id} is closed")
        rid = next(self._ids)
        q: asyncio.Queue[pb.SessionMessage] = asyncio.Queue()
        self._pending[rid] = q
        try:
            self._send(pb.SessionMessage(id=rid, **kw))
            yield rid, q
        finally:
            del self._pending[rid]

    async def _answer(self, q: asyncio.Queue[pb.SessionMessage]) -> pb.SessionMessage:
        msg = await q.get()
        if msg is _CLOSED:
            raise SessionClosed(f"session {self.id} closed by the client")
        if msg.WhichOneof("msg") == "error":
            raise WorldError(f"client session: {msg.error.message}")
        return msg

    async def stat(self, dir_name: str) -> list[filesync.FileStat]:
        if dir_name not in self.dirs:
            raise NotFoundError(f"the client's session serves no local dir {dir_name!r}")
        out: list[filesync.FileStat] = []
        with self._request(stat_request=pb.StatRequest(dir=dir_name)) as (_, q):
            while True:
                msg = _expect(await self._answer(q), "stat_batch", "a stat request")
                for raw in msg.stat_batch.stats_json:
                    try:
                        out.append(filesync.FileStat.from_json(json.loads(raw)))
                    # RecursionError: a stat nested thousands of arrays deep
                    except (ValueError, KeyError, TypeError, RecursionError) as exc:
                        raise UserError(f"bad file stat from the client: {exc}") from None
                if msg.stat_batch.done:
                    return out

    async def fetch(self, dir_name: str, transfer: _Transfer) -> None:
        """Ask for the files ``transfer`` wants and write them into it."""
        wanted = list(transfer.wanted)
        if not wanted:
            return
        allowed = set(wanted)
        req = pb.FilesRequest(dir=dir_name, paths=wanted)

        def write(batch: list[tuple[str, bytes]]) -> None:
            for path, data in batch:
                transfer.write(path, data)

        with self._request(files_request=req) as (_, q):
            batch: list[tuple[str, bytes]] = []
            size = 0
            while True:
                chunk = _expect(await self._answer(q), "file_chunk", "a files request").file_chunk
                if not chunk.done:
                    if chunk.path not in allowed:
                        raise UnsafePathError(
                            f"client sent {chunk.path!r}, which was not asked for"
                        )
                    batch.append((chunk.path, chunk.data))
                    size += len(chunk.data)
                # what has already arrived is written in one thread hop: one hop per
                # chunk was most of the time of a context of small files
                full = size >= _BATCH_BYTES or len(batch) >= _BATCH_CHUNKS
                if batch and (chunk.done or full or q.empty()):
                    await asyncio.to_thread(write, batch)
                    batch, size = [], 0
                if chunk.done:
                    return

    async def get_secret(self, secret_id: str) -> bytes | None:
        if secret_id not in self.secret_ids:
            return None
        with self._request(secret_request=pb.SecretRequest(secret_id=secret_id)) as (_, q):
            msg = await self._answer(q)
            return msg.secret_response.data if msg.secret_response.found else None

    async def credentials(self, host: str) -> tuple[str, str] | None:
        with self._request(credentials_request=pb.CredentialsRequest(host=host)) as (_, q):
            msg = await self._answer(q)
            r = msg.credentials_response
            return (r.username, r.secret) if r.found else None

    def has_agent(self, agent_id: str) -> bool:
        return agent_id in self.ssh_ids

    async def connect_agent(self, agent_id: str) -> Duplex:
        if agent_id not in self.ssh_ids:
            raise LookupError(agent_id)
        rid = next(self._ids)
        q: asyncio.Queue[pb.SessionMessage] = asyncio.Queue()
        self._pending[rid] = q
        self._send(pb.SessionMessage(id=rid, ssh_open=pb.SSHOpen(agent_id=agent_id)))
        return _RemoteConn(self, rid, q)


class _ChunkBatches:
    """The chunks of ``paths`` in order, handed out a batch at a time.

    Each ``next_batch`` runs on a worker thread and reads until it holds
    ``_BATCH_BYTES`` or ``_BATCH_CHUNKS``; a file may span batches (its reader
    is kept, and batches are read one after another, never at once)."""

    def __init__(self, root: Path, paths: list[str], sizes: dict[str, int]) -> None:
        self._root = root
        self._paths = iter(paths)
        self._sizes = sizes
        self._file: tuple[str, Iterator[bytes]] | None = None

    def next_batch(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        size = 0
        while size < _BATCH_BYTES and len(out) < _BATCH_CHUNKS:
            if self._file is None:
                path = next(self._paths, None)
                if path is None:
                    break
                it = filesync.read_chunks(self._root, path, _CHUNK, size=self._sizes.get(path))
                self._file = (path, it)
            path, it = self._file
            chunk = next(it, None)
            if chunk is None:
                self._file = None
                continue
            out.append((path, chunk))
            size += len(chunk)
        return out


def _expect(msg: pb.SessionMessage, kind: str, what: str) -> pb.SessionMessage:
    """``msg`` if it is a ``kind``: a client answering out of turn (a file chunk to
    a stat request) would otherwise be read as an empty answer and waited past."""
    got = msg.WhichOneof("msg")
    if got != kind:
        raise UserError(f"context sync: the client answered {what} with {got or 'nothing'}")
    return msg


class _RemoteConn:
    """One ssh agent connection tunnelled through the session (worker side)."""

    def __init__(self, s: WorkerSession, rid: int, q: asyncio.Queue[pb.SessionMessage]) -> None:
        self._s = s
        self._id = rid
        self._q = q
        self._buf = b""
        self._eof = False

    async def read(self, n: int) -> bytes:
        while not self._buf and not self._eof:
            msg = await self._q.get()
            if msg is _CLOSED or msg.WhichOneof("msg") != "ssh_data":
                self._eof = True
            else:
                self._buf = msg.ssh_data.data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def write(self, data: bytes) -> None:
        if self._s.closed.is_set():
            raise SessionClosed("session closed")
        self._s._send(pb.SessionMessage(id=self._id, ssh_data=pb.SSHData(data=data)))

    async def close(self) -> None:
        if self._s._pending.pop(self._id, None) is not None and not self._s.closed.is_set():
            self._s._send(pb.SessionMessage(id=self._id, ssh_close=pb.SSHClose()))


class SessionHub:
    """Open sessions by id (a Solve names the session it uses)."""

    def __init__(self) -> None:
        self._sessions: dict[str, WorkerSession] = {}

    def add(self, s: WorkerSession) -> None:
        if s.id in self._sessions:
            raise UserError(f"session {s.id!r} is already open")
        self._sessions[s.id] = s

    def remove(self, s: WorkerSession) -> None:
        if self._sessions.get(s.id) is s:
            del self._sessions[s.id]
        s.close()

    def get(self, session_id: str) -> WorkerSession:
        s = self._sessions.get(session_id)
        if s is None:
            raise UserError(f"no open session {session_id!r}: open the session before the solve")
        return s


# --- client side ----------------------------------------------------------------


class _Call(Protocol):
    async def write(self, msg: pb.SessionMessage) -> None: ...

    async def read(self) -> object: ...


class ClientSession:
    """Serves the worker's requests from local providers (client side)."""

    def __init__(
        self,
        session_id: str,
        dirs: Mapping[str, tuple[Path, IgnoreMatcher | None]],
        secrets: Secrets | None = None,
        secret_ids: Sequence[str] = (),
        ssh: SSHAgents | None = None,
        ssh_ids: Sequence[str] = (),
        credentials: Credentials | None = None,
    ) -> None:
        self.id = session_id
        self.dirs = dict(dirs)
        self.secrets = secrets
        self.secret_ids = tuple(secret_ids)
        self.ssh = ssh
        self.ssh_ids = tuple(ssh_ids)
        self.creds = credentials
        self.bytes_sent = 0
        self._out: asyncio.Queue[pb.SessionMessage] = asyncio.Queue(maxsize=64)
        self._conns: dict[int, Duplex] = {}
        # bytes for each ssh connection, in arrival order: they may arrive before the
        # agent is connected (ssh writes its request right after the open)
        self._inbox: dict[int, asyncio.Queue[bytes | None]] = {}
        self._sizes: dict[str, dict[str, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def hello(self) -> pb.SessionMessage:
        return pb.SessionMessage(
            hello=pb.SessionHello(
                session_id=self.id,
                dirs=sorted(self.dirs),
                secret_ids=self.secret_ids,
                ssh_ids=self.ssh_ids,
            )
        )

    async def serve(self, call: _Call, eof: object) -> None:
        """Answer requests until the worker ends the stream (or we are cancelled)."""
        writer = asyncio.create_task(self._write_loop(call))
        try:
            while True:
                msg = await call.read()
                if msg is eof or not isinstance(msg, pb.SessionMessage):
                    return
                which = msg.WhichOneof("msg")
                if which in ("ssh_open", "ssh_data", "ssh_close"):
                    # queued here, in stream order, before any task runs: a
                    # connection's bytes must be neither reordered nor dropped
                    self._ssh_message(msg)
                else:
                    self._spawn(self._handle(msg))
        finally:
            writer.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(writer, *self._tasks, return_exceptions=True)
            for conn in list(self._conns.values()):
                with contextlib.suppress(Exception):
                    await conn.close()

    def _spawn(self, coro: Any) -> None:
        t: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _write_loop(self, call: _Call) -> None:
        while True:
            await call.write(await self._out.get())

    async def _put(self, **kw: Any) -> None:
        await self._out.put(pb.SessionMessage(**kw))

    async def _handle(self, msg: pb.SessionMessage) -> None:
        which = msg.WhichOneof("msg")
        try:
            if which == "stat_request":
                await self._stat(msg.id, msg.stat_request.dir)
            elif which == "files_request":
                await self._files(msg.id, msg.files_request.dir, list(msg.files_request.paths))
            elif which == "secret_request":
                data = None
                if self.secrets is not None:
                    data = await self.secrets.get_secret(msg.secret_request.secret_id)
                await self._put(
                    id=msg.id,
                    secret_response=pb.SecretResponse(found=data is not None, data=data or b""),
                )
            elif which == "credentials_request":
                got = None
                if self.creds is not None:
                    got = await self.creds.credentials(msg.credentials_request.host)
                await self._put(
                    id=msg.id,
                    credentials_response=pb.CredentialsResponse(
                        found=got is not None,
                        username=got[0] if got else "",
                        secret=got[1] if got else "",
                    ),
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._put(id=msg.id, error=pb.SessionError(message=str(exc)))

    def _dir(self, name: str) -> tuple[Path, IgnoreMatcher | None]:
        got = self.dirs.get(name)
        if got is None:
            raise NotFoundError(f"no local dir {name!r} in this session")
        return got

    async def _stat(self, rid: int, name: str) -> None:
        root, ignore = self._dir(name)
        stats = await asyncio.to_thread(filesync.scan, root, ignore)
        # sizes as announced: a file that changes size before it is sent fails
        self._sizes[name] = {s.path: s.size for s in stats}
        for i in range(0, max(len(stats), 1), _STAT_BATCH):
            part = stats[i : i + _STAT_BATCH]
            done = i + _STAT_BATCH >= len(stats)
            raw = [json.dumps(s.to_json()).encode() for s in part]
            await self._put(id=rid, stat_batch=pb.StatBatch(stats_json=raw, done=done))

    async def _files(self, rid: int, name: str, paths: list[str]) -> None:
        root, _ = self._dir(name)
        reader = _ChunkBatches(root, paths, self._sizes.get(name, {}))
        # a thread hop per batch, not per chunk: a context of small files paid two
        # hops per file, a third of the daemon path's transfer time (a message per
        # chunk is not what costs: batching those too gained nothing measurable)
        while batch := await asyncio.to_thread(reader.next_batch):
            for path, chunk in batch:
                self.bytes_sent += len(chunk)
                await self._put(id=rid, file_chunk=pb.FileChunk(path=path, data=chunk))
        await self._put(id=rid, file_chunk=pb.FileChunk(done=True))

    def _ssh_message(self, msg: pb.SessionMessage) -> None:
        which = msg.WhichOneof("msg")
        if which == "ssh_open":
            inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
            self._inbox[msg.id] = inbox
            self._spawn(self._ssh_conn(msg.id, msg.ssh_open.agent_id, inbox))
            return
        box = self._inbox.get(msg.id)
        if box is not None:
            box.put_nowait(msg.ssh_data.data if which == "ssh_data" else None)

    async def _ssh_conn(self, rid: int, agent_id: str, inbox: asyncio.Queue[bytes | None]) -> None:
        """One agent connection: the worker's bytes in from ``inbox``, the agent's out."""
        try:
            if self.ssh is None or agent_id not in self.ssh_ids:
                await self._put(id=rid, ssh_close=pb.SSHClose())
                return
            try:
                conn = await self.ssh.connect_agent(agent_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._put(id=rid, error=pb.SessionError(message=str(exc)))
                return
            self._conns[rid] = conn
            up = asyncio.create_task(self._ssh_up(conn, inbox))
            worker_closed = False
            try:
                while data := await conn.read(65536):
                    await self._put(id=rid, ssh_data=pb.SSHData(data=data))
            except OSError:
                pass  # the agent went away: the worker is told by the close below
            finally:
                worker_closed = up.done() and not up.cancelled() and up.exception() is None
                up.cancel()
                await asyncio.gather(up, return_exceptions=True)
                self._conns.pop(rid, None)
                await conn.close()
            if not worker_closed:
                await self._put(id=rid, ssh_close=pb.SSHClose())
        finally:
            self._inbox.pop(rid, None)

    @staticmethod
    async def _ssh_up(conn: Duplex, inbox: asyncio.Queue[bytes | None]) -> None:
        """The worker's bytes to the agent until the worker closes; then closing the
        agent connection ends the reader above."""
        while (data := await inbox.get()) is not None:
            await conn.write(data)
        await conn.close()
