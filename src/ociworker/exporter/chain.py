"""The layer blob of each snapshot in a chain: diffed once per compression, remembered.

A snapshot's layer is its diff from its parent (the snapshot below it in the
chain). Pulled layers are recorded under ``source`` when they are unpacked and
are exported as they came; built ones are diffed by the ``Comparer`` on first
use and recorded in the layer cache, so an export of a cached build diffs nothing.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Protocol

from ociworker.content.store import ContentStore
from ociworker.core.mounts import Mount
from ociworker.core.oci import Layer
from ociworker.diff.base import Comparer, CompressionOpts
from ociworker.exporter.layercache import SOURCE, LayerCache
from ociworker.snapshot import access
from ociworker.snapshot.base import SnapshotCatalog, Snapshotter
from ociworker.solver.scheduler import REMOTE, Result

#: diffIDs of a tar with no entries (Go's writer pads to 2 blocks, Python's to a record)
EMPTY_TAR_DIFF_IDS = frozenset(
    "sha256:" + hashlib.sha256(b"\0" * n).hexdigest() for n in (1024, 10240)
)


#: the chain name of a result found in an imported cache (``scheduler.REMOTE``):
#: the ``ChainLayers`` of a build that imports (``remotecache.importer``) read it
REMOTE_CHAIN = "remote:"


def chain_name(result: Result) -> str | None:
    """What ``ChainLayers.chain`` takes for a solved result (None: scratch)."""
    if result.kind == REMOTE:
        return REMOTE_CHAIN + result.ref
    return result.ref if result.kind == "snapshot" else None


class ChainSnapshots(Snapshotter, SnapshotCatalog, Protocol):
    """A snapshotter that can also say what is below a committed snapshot."""


def is_empty(layer: Layer) -> bool:
    """A layer that changes nothing (BuildKit drops it from images)."""
    return layer.diff_id in EMPTY_TAR_DIFF_IDS


def layer_cache_key(opts: CompressionOpts) -> str:
    """What a snapshot's layer is remembered under: one blob per compression,
    and per SOURCE_DATE_EPOCH when file times are clamped (a layer made for
    another epoch, or none, has other bytes)."""
    if opts.epoch is None:
        return opts.compression
    return f"{opts.compression};epoch={opts.epoch}"


class ChainLayers(Protocol):
    """What image assembly and ``type=layers`` need: chains and their layers."""

    async def chain(self, name: str | None) -> list[str]: ...

    async def layer_of(self, chain: Sequence[str], index: int, opts: CompressionOpts) -> Layer: ...


class SnapshotLayers:
    """Turns committed snapshots into layer blobs in ``content``.

    The comparer is called only when a snapshot has no layer yet (the worker's
    comparer loads the differ on first call: a fully cached build never does).
    """

    def __init__(
        self,
        snapshots: ChainSnapshots,
        comparer: Comparer,
        cache: LayerCache,
        content: ContentStore,
    ) -> None:
        self._snapshots = snapshots
        self._comparer = comparer
        self._cache = cache
        self._content = content

    async def chain(self, name: str | None) -> list[str]:
        """Committed snapshot names from the base to ``name`` (none for scratch)."""
        return await access.snapshot_chain(self._snapshots, name)

    async def layer_of(self, chain: Sequence[str], index: int, opts: CompressionOpts) -> Layer:
        """The layer blob for chain[index] (its diff from chain[index-1]), made once."""
        name = chain[index]
        comp = layer_cache_key(opts)
        layer = self._cache.get_layer(name, comp) or self._cache.get_layer(name, SOURCE)
        if layer is not None and self._content.has(layer.descriptor.digest):
            return layer
        parent = chain[index - 1] if index else None
        upper_key = f"diff-{uuid.uuid4().hex}"
        lower_key = f"diff-{uuid.uuid4().hex}"
        upper = await self._snapshots.view(upper_key, name)
        try:
            lower: Sequence[Mount] = ()
            if parent is not None:
                lower = await self._snapshots.view(lower_key, parent)
            try:
                layer = await self._comparer.compare(lower, upper, opts)
            finally:
                if parent is not None:
                    await self._snapshots.remove(lower_key)
        finally:
            await self._snapshots.remove(upper_key)
        self._cache.put_layer(name, comp, layer)
        # as recorded: dated by the snapshot's first layer (an earlier compression's)
        return self._cache.get_layer(name, comp) or layer
