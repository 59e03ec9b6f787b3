"""What the merge and diff handlers share: their deps, and the layer blob of
each snapshot of a chain (``exporter.chain.SnapshotLayers``, so a layer diffed
for a merge is the one an export takes, and the other way round)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.content.store import ContentStore
from ociworker.core.graph import Vertex
from ociworker.core.mounts import Mount
from ociworker.diff.base import Applier, Comparer, CompressionOpts
from ociworker.errors import UserError
from ociworker.exporter.chain import SnapshotLayers
from ociworker.exporter.layercache import LayerCache
from ociworker.ops.parts import HandlerBase
from ociworker.snapshot.base import SnapshotCatalog, SnapshotInfo, Snapshotter
from ociworker.solver.scheduler import Job, Result, default_cache_key

#: the compression a merge or diff diffs in: the exporters' default, so an image
#: export of the default kind reuses the blob
LAYER_OPTS = CompressionOpts()


@dataclass(frozen=True)
class LayeredDeps:
    snapshots: Snapshotter
    catalog: SnapshotCatalog
    applier: Applier
    content: ContentStore
    layers: LayerCache
    scratch: Path
    comparer: Comparer | None = None


class _Chain:
    """The snapshotter and its catalog as the one object ``SnapshotLayers`` takes
    (the worker's parts name them apart)."""

    def __init__(self, snapshots: Snapshotter, catalog: SnapshotCatalog) -> None:
        self._s = snapshots
        self._c = catalog

    async def prepare(self, key: str, parent: str | None) -> Sequence[Mount]:
        return await self._s.prepare(key, parent)

    async def view(self, key: str, parent: str | None) -> Sequence[Mount]:
        return await self._s.view(key, parent)

    async def commit(self, name: str, key: str) -> None:
        await self._s.commit(name, key)

    async def remove(self, key: str) -> None:
        await self._s.remove(key)

    async def mounts(self, key: str) -> Sequence[Mount]:
        return await self._s.mounts(key)

    async def stat(self, key: str) -> SnapshotInfo | None:
        return await self._c.stat(key)

    async def usage(self, key: str) -> int:
        return await self._c.usage(key)

    async def walk(self) -> Sequence[SnapshotInfo]:
        return await self._c.walk()


class LayeredHandler(HandlerBase[LayeredDeps]):
    """Base of the merge and diff handlers: keyed by op and inputs' keys alone
    (their inputs are filesystems, never local contexts)."""

    deps_type = LayeredDeps

    def comparer(self) -> Comparer:
        if self.deps.comparer is None:
            raise UserError("this worker has no layer comparer: merge and diff cannot run")
        return self.deps.comparer

    def chain_layers(self) -> SnapshotLayers:
        d = self.deps
        return SnapshotLayers(_Chain(d.snapshots, d.catalog), self.comparer(), d.layers, d.content)

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        return default_cache_key(vertex, input_keys)


def snapshot_of(result: Result, what: str) -> str | None:
    """The committed snapshot of an input (None: scratch); a local source is
    refused (copy it into a filesystem first, as ``ociworker.graph`` does)."""
    if result.kind == "none":
        return None
    if result.kind != "snapshot":
        raise UserError(f"{what} takes filesystems, not a {result.kind} input")
    return result.ref
