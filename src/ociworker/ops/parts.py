"""``OpParts``: every part an op handler may draw on, as the composition root
(``worker.open_worker``) built them. Each handler's ``from_parts`` picks the few
it needs into its own small ``...Deps``; tests build the Deps directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ociworker.content.store import ContentStore
from ociworker.core.oci import Platform
from ociworker.diff.base import Applier
from ociworker.executor.base import Executor
from ociworker.exporter.layercache import LayerCache
from ociworker.ops.context import ContextChecksums
from ociworker.ops.runmount.cache import CacheMounts
from ociworker.registry.client import RegistryClient
from ociworker.snapshot.base import Mounter, SnapshotCatalog, Snapshotter
from ociworker.sources.image import ImagePuller


@dataclass(frozen=True)
class OpParts:
    content: ContentStore
    snapshots: Snapshotter
    catalog: SnapshotCatalog
    mounter: Mounter
    executor: Executor
    applier: Applier
    registry: RegistryClient
    puller: ImagePuller
    layers: LayerCache
    cache_mounts: CacheMounts
    #: mount points and scratch copies of the handlers
    scratch: Path
    checksums: ContextChecksums
    platform: Platform
