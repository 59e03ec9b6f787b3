"""The host side of ``RUN --mount=type=ssh``: one unix socket per ssh mount,
listening in a private 0700 dir; each connection a step makes is proxied to
``SSHAgents.connect_agent(id)``, which the client serves (a forwarded agent, or
our own agent holding key files).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.core.session import Duplex, SSHAgents
from ociworker.log import get_logger
from ociworker.ops.runmount.secret import private_dir

_log = get_logger("ociworker.ops.runmount.ssh")
_CHUNK = 65536


@dataclass(frozen=True)
class AgentSocket:
    agent_id: str
    mode: int = 0o600
    uid: int = 0
    gid: int = 0


class _Forwarder:
    def __init__(self, agents: SSHAgents, agent_id: str) -> None:
        self._agents = agents
        self._id = agent_id
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The teardown cancels the inner task, never this one: Python 3.11's
        # stream server logs a traceback for a handler that ends cancelled.
        task = asyncio.ensure_future(self._serve(reader, writer))
        self.tasks.add(task)
        try:
            await asyncio.wait([task])
        finally:
            task.cancel()  # a no-op once it ended; else this handler was cancelled
            self.tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
    d = await asyncio.to_thread(private_dir, tmp, "ssh-")
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
