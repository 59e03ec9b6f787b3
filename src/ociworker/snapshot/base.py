"""Snapshotter Protocols (containerd's vocabulary).

A snapshot has a ``key`` while active (writable, from ``prepare``) and a ``name``
once committed. Committed snapshots are immutable parents of later ones. All
methods are async because an implementation may copy whole trees (native).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ociworker.core.mounts import Mount

Kind = Literal["active", "view", "committed"]


@dataclass(frozen=True)
class SnapshotInfo:
    key: str  # the key (active/view) or the name (committed)
    kind: Kind
    parent: str | None  # name of the committed parent, or None


class Snapshotter(Protocol):
    async def prepare(self, key: str, parent: str | None) -> Sequence[Mount]:
        """A writable snapshot ``key`` on top of the committed ``parent``; its mounts."""
        ...

    async def view(self, key: str, parent: str | None) -> Sequence[Mount]:
        """A read-only snapshot ``key`` of ``parent``; its mounts."""
        ...

    async def commit(self, name: str, key: str) -> None:
        """Turn active ``key`` into committed ``name``; ``key`` is gone afterwards."""
        ...

    async def remove(self, key: str) -> None:
        """Remove an active/view key or a committed name that has no children."""
        ...

    async def mounts(self, key: str) -> Sequence[Mount]:
        """The mounts of an existing active or view snapshot."""
        ...


class SnapshotCatalog(Protocol):
    async def stat(self, key: str) -> SnapshotInfo | None: ...

    async def usage(self, key: str) -> int:
        """Bytes used by this snapshot alone (not its parents)."""
        ...

    async def walk(self) -> Sequence[SnapshotInfo]: ...


class SnapshotStore(Snapshotter, SnapshotCatalog, Protocol):
    """Both halves on one root, as the worker holds them."""

    async def recover(self) -> int:
        """Drop the active and view snapshots of processes that died (called by
        whoever owns the root, before first use); how many were dropped."""
        ...


class Mounter(Protocol):
    """Makes snapshot mounts visible as a directory for in-process work (COPY, a
    differ's view, an export). The real one calls mount(2) (``fs.mount``); the
    unit tests' fake maps the in-memory snapshotter's mounts to plain dirs."""

    def mounted(self, mounts: Sequence[Mount]) -> AbstractAsyncContextManager[Path]:
        """Mount ``mounts`` on a fresh dir; unmount and remove it on exit."""
        ...
