"""The host side of ``RUN --mount=type=ssh``: a step's connection is proxied to
the session's agent, and the step's end closes what is still open without the
event loop reporting an error (Python 3.11's stream server logs a traceback for
a connection handler that ends cancelled: the user would see it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ociworker.ops.runmount.ssh import AgentSocket, agent_sockets


class _Echo:
    def __init__(self) -> None:
        self._q: asyncio.Queue[bytes] = asyncio.Queue()

    async def read(self, n: int) -> bytes:
        return await self._q.get()

    async def write(self, data: bytes) -> None:
        await self._q.put(data.upper())

    async def close(self) -> None:
        await self._q.put(b"")


class _Agents:
    def has_agent(self, agent_id: str) -> bool:
        return True

    async def connect_agent(self, agent_id: str) -> _Echo:
        return _Echo()


async def test_open_connections_are_closed_quietly_at_the_steps_end(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        async with agent_sockets(tmp_path, _Agents(), [AgentSocket("default")]) as paths:
            conns = [await asyncio.open_unix_connection(str(paths[0])) for _ in range(3)]
            for reader, writer in conns:
                writer.write(b"ping")
                await writer.drain()
                assert await reader.readexactly(4) == b"PING"
            # the step ends with the connections still open (a process left behind)
        for reader, writer in conns:
            assert await reader.read() == b""  # closed by the teardown
            writer.close()
        for _ in range(3):
            await asyncio.sleep(0)  # let any done-callback run
    finally:
        loop.set_exception_handler(None)
    assert reported == []
    assert list(tmp_path.iterdir()) == []  # the private socket dir is gone
