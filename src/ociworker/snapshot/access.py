"""Using snapshots: a mounted read-only view, a new snapshot made by some work,
the chain below a committed one. Shared by the op handlers and the exporters,
on any ``Snapshotter`` and ``Mounter`` (real or the unit tests' fakes)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from ociworker.core.mounts import Mount
from ociworker.errors import NotFoundError
from ociworker.snapshot.base import Mounter, SnapshotCatalog, Snapshotter


@contextlib.asynccontextmanager
async def view(
    snapshots: Snapshotter, mounter: Mounter, name: str | None, scratch_dir: Path
) -> AsyncIterator[Path]:
    """A read-only mounted view of the committed snapshot ``name`` (an empty dir
    under ``scratch_dir`` for None: scratch has no files)."""
    if name is None:
        d = scratch_dir / f"empty-{uuid.uuid4().hex}"
        d.mkdir()
        try:
            yield d
        finally:
            d.rmdir()
        return
    key = f"view-{uuid.uuid4().hex}"
    mounts = await snapshots.view(key, name)
    try:
        async with mounter.mounted(mounts) as path:
            yield path
    finally:
        await snapshots.remove(key)


async def new_snapshot(
    snapshots: Snapshotter,
    parent: str | None,
    work: Callable[[Sequence[Mount]], Awaitable[None]],
) -> str:
    """Prepare a snapshot on ``parent``, let ``work`` change it, commit it; its name.

    Whatever goes wrong (or a cancellation) removes the active snapshot, so a
    failed step leaves nothing in the snapshotter.
    """
    key = f"active-{uuid.uuid4().hex}"
    mounts = await snapshots.prepare(key, parent)
    try:
        await work(mounts)
        name = f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}"
        await snapshots.commit(name, key)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(snapshots.remove(key))
        raise
    return name


async def snapshot_chain(catalog: SnapshotCatalog, name: str | None) -> list[str]:
    """Committed snapshot names from the base to ``name``."""
    chain: list[str] = []
    while name is not None:
        info = await catalog.stat(name)
        if info is None:
            raise NotFoundError(f"snapshot {name} is gone from the snapshotter")
        chain.append(name)
        name = info.parent
    chain.reverse()
    return chain


async def drop_uncommitted(snapshots: Snapshotter, catalog: SnapshotCatalog) -> int:
    """Remove every active and view snapshot; how many (start-up recovery: their
    users are gone, and nothing may have them mounted any more)."""
    dropped = 0
    for info in await catalog.walk():
        if info.kind != "committed":
            await snapshots.remove(info.key)
            dropped += 1
    return dropped
