"""Per-step host resources behind ``RUN --mount=type=secret`` and ``type=ssh``.

Secrets: the step's secret files are written to a fresh tmpfs that we mount
(under the state dir's tmp, in a 0700 dir) for the step alone, and are
bind-mounted read-only from there; the tmpfs is unmounted when the step ends,
so a secret's bytes never touch a disk.

SSH: one unix socket per ssh mount, listening in a private 0700 dir; each
connection a step makes is proxied to ``SSHAgents.connect_agent(id)``, which
the client serves (a forwarded agent, or our own agent holding key files).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ociworker.core.mounts import Mount
from ociworker.core.session import Duplex, SSHAgents
from ociworker.log import get_logger
from ociworker.snapshot.mount import mount_all, unmount

_log = get_logger("ociworker.stepmounts")
_CHUNK = 65536


@dataclass(frozen=True)
class SecretFile:
    data: bytes = field(repr=False)
    mode: int = 0o400
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class AgentSocket:
    agent_id: str
    mode: int = 0o600
    uid: int = 0
    gid: int = 0


def _private_dir(tmp: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp, prefix=prefix))  # mkdtemp makes it 0700


def _tmpfs_size(files: Sequence[SecretFile]) -> int:
    # page-rounded per file plus slack for inodes; secrets are at most 500 KiB each
    return sum((len(f.data) // 4096 + 2) * 4096 for f in files) + 65536


def _mount_secrets(d: Path, files: Sequence[SecretFile]) -> list[Path]:
    opts = ("nosuid", "nodev", "noexec", "mode=0700", f"size={_tmpfs_size(files)}")
    mount_all([Mount("tmpfs", "tmpfs", opts)], d)
    paths = []
    for i, f in enumerate(files):
        path = d / f"secret-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(f.data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchown(fd, f.uid, f.gid)
            os.fchmod(fd, f.mode)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def _release(d: Path) -> None:
    unmount(d)
    d.rmdir()


@contextlib.asynccontextmanager
async def secret_files(tmp: Path, files: Sequence[SecretFile]) -> AsyncIterator[list[Path]]:
    """Host paths of ``files``, on a tmpfs that exists only inside the ``with``."""
    if not files:
        yield []
        return
    d = await asyncio.to_thread(_private_dir, tmp, "secrets-")
    mounting = asyncio.ensure_future(asyncio.to_thread(_mount_secrets, d, files))
    try:
        # shielded: a cancel must not leave the tmpfs mounted behind our back
        paths = await asyncio.shield(mounting)
        yield paths
    finally:
        await asyncio.wait([mounting])
        if not mounting.cancelled():
            mounting.exception()
        await asyncio.shield(asyncio.to_thread(_release, d))


class _Forwarder:
    def __init__(self, agents: SSHAgents, agent_id: str) -> None:
        self._agents = agents
        self._id = agent_id
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        conn: Duplex | None = None
        try:
            conn = await self._agents.connect_agent(self._id)
            await _splice(reader, writer, conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("ssh agent forwarding failed", agent=self._id, error=str(exc))
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self.tasks.discard(task)


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Duplex) -> None:
    async def up() -> None:
        while data := await reader.read(_CHUNK):
            await conn.write(data)

    async def down() -> None:
        while data := await conn.read(_CHUNK):
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            exc = t.exception()
            if not isinstance(exc, ConnectionError):
                raise exc  # type: ignore[misc]


@contextlib.asynccontextmanager
async def agent_sockets(
    tmp: Path, agents: SSHAgents, sockets: Sequence[AgentSocket]
) -> AsyncIterator[list[Path]]:
    """Host paths of listening sockets, one per ``sockets``, proxied to ``agents``."""
    if not sockets:
        yield []
        return
    d = await asyncio.to_thread(_private_dir, tmp, "ssh-")
    servers: list[asyncio.Server] = []
    forwarders: list[_Forwarder] = []
    try:
        paths = []
        for i, s in enumerate(sockets):
            fw = _Forwarder(agents, s.agent_id)
            path = d / f"agent.{i}"
            servers.append(await asyncio.start_unix_server(fw.handle, path=str(path)))
            forwarders.append(fw)
            os.chown(path, s.uid, s.gid)
            os.chmod(path, s.mode)
            paths.append(path)
        yield paths
    finally:
        for srv in servers:
            srv.close()
        tasks = [t for fw in forwarders for t in fw.tasks]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for srv in servers:
            await srv.wait_closed()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
