"""What a build's client lends the worker for one job (Protocols, pure).

In the embedded worker these are served from the local process (files, env,
``$SSH_AUTH_SOCK``); under the daemon they are proxied over the client's
session stream. Handlers only ever see these Protocols, so a secret's bytes
pass through memory and a tmpfs, never through the state dir.
"""

from __future__ import annotations

from typing import Protocol


class Secrets(Protocol):
    async def get_secret(self, secret_id: str) -> bytes | None:
        """The secret's value, or None when the client did not provide it."""
        ...


class Duplex(Protocol):
    """One byte-stream connection (e.g. to an ssh agent)."""

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at end of stream."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class SSHAgents(Protocol):
    def has_agent(self, agent_id: str) -> bool: ...

    async def connect_agent(self, agent_id: str) -> Duplex:
        """A new connection to the agent the client named ``agent_id``."""
        ...


class Credentials(Protocol):
    async def credentials(self, host: str) -> tuple[str, str] | None:
        """(username, password or identity token) for a registry host, or None."""
        ...


class NoSecrets:
    async def get_secret(self, secret_id: str) -> bytes | None:
        return None


class NoCredentials:
    """Anonymous access everywhere: what a job gets unless its client lends more."""

    async def credentials(self, host: str) -> tuple[str, str] | None:
        return None


class NoSSH:
    def has_agent(self, agent_id: str) -> bool:
        return False

    async def connect_agent(self, agent_id: str) -> Duplex:
        raise LookupError(agent_id)
