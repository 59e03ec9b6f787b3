"""``OpParts``: every part an op handler may draw on, as the composition root
(``worker.open_worker``) built them. Each handler's ``from_parts`` picks the few
it needs into its own small ``...Deps`` (``OpParts.pick``: by field name); tests
build the Deps directly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, Self, TypeVar, cast

from ociworker.content.store import ContentStore
from ociworker.core.graph import Copy, OpSpec, Vertex
from ociworker.core.oci import Platform
from ociworker.diff.base import Applier, Comparer
from ociworker.executor.base import Executor, StepLimits
from ociworker.exporter.layercache import LayerCache
from ociworker.ops.context import ContextChecksums, context_keyed
from ociworker.ops.runmount.cache import CacheMounts
from ociworker.registry.client import RegistryClient
from ociworker.snapshot.base import Mounter, SnapshotCatalog, Snapshotter
from ociworker.solver.scheduler import Job
from ociworker.sources.git import GitFetcher
from ociworker.sources.image import ImagePuller

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")


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
    #: the worker's per-step memory, pids and CPU limits
    step_limits: StepLimits = field(default_factory=StepLimits)
    #: entitlements the worker grants (``WorkerConfig.entitlements``)
    entitlements: tuple[str, ...] = ()
    #: records of ``ADD URL`` downloads (ETag, Last-Modified, digest); None: none
    http_state: Path | None = None
    #: git sources' fetcher and checkout cache (``<root>/git``)
    git: GitFetcher | None = None
    #: what merge and diff steps diff snapshots with (None: they cannot run)
    comparer: Comparer | None = None

    def pick(self, deps: type[D]) -> D:
        """The dataclass ``deps`` with each field taken from the part of the same
        name (fields no part is named for keep their defaults)."""
        mine = {f.name for f in fields(self)}
        chosen = {f.name: getattr(self, f.name) for f in fields(deps) if f.name in mine}
        return cast(Callable[..., D], deps)(**chosen)


@dataclass(frozen=True)
class StepDeps:
    """What a handler needs to make a step's new snapshot from its inputs."""

    snapshots: Snapshotter
    mounter: Mounter
    #: mount points, empty dirs for scratch inputs, the step's scratch copies
    scratch: Path
    checksums: ContextChecksums


class HandlerBase(Generic[D]):
    """Base of the op handlers: holds the handler's deps (``deps_type``), and
    builds them from the worker's parts by field name (``from_parts``)."""

    deps_type: ClassVar[type[DataclassInstance]]

    def __init__(self, deps: D) -> None:
        self.deps = deps

    @classmethod
    def from_parts(cls, parts: OpParts) -> Self:
        return cls(cast(D, parts.pick(cls.deps_type)))


S = TypeVar("S", bound=StepDeps)


class StepHandler(HandlerBase[S]):
    """Base of the handlers of steps that make a snapshot from their inputs: the
    cache key takes from each local-context input only what ``selected(op, input
    index)`` names (``context.context_keyed``)."""

    @staticmethod
    def selected(op: OpSpec, index: int) -> list[Copy]:
        return []

    async def cache_key(self, vertex: Vertex, input_keys: Sequence[str], job: Job) -> str:
        return await context_keyed(self.deps.checksums, vertex, input_keys, job, self.selected)
