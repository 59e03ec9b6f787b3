"""The composition root: ``open_worker`` picks the concrete parts for a
``WorkerConfig`` and wires them into a ``Worker``; nothing else chooses a
snapshotter, executor, differ or registry client. The op handlers are in
``ociworker.ops``; a ``Worker`` built from its parts (fakes, in the unit tests)
is what the controller, the exporters and the API use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from ociworker.cachedb.records import SQLiteCacheIndex
from ociworker.content.store import ContentStore
from ociworker.core.build import DEFAULT_ROOT as DEFAULT_ROOT
from ociworker.core.digest import Digest
from ociworker.core.entitlements import ENTITLEMENTS
from ociworker.core.mounts import Mount
from ociworker.core.oci import Descriptor, Layer, Platform
from ociworker.diff.base import Applier, Comparer, CompressionOpts
from ociworker.errors import OciworkerError
from ociworker.executor.base import (
    NetworkMode,
    OutputSink,
    ProcessSpec,
    RecoverableExecutor,
    StepLimits,
)
from ociworker.executor.binary import find_runtime as find_runtime  # the CLI checks --runtime first
from ociworker.exporter.imagestore import ImageStore
from ociworker.exporter.layercache import SQLiteLayerCache
from ociworker.fs.mount import HostMounter, unmount_below
from ociworker.fs.tree import empty_dir
from ociworker.log import get_logger
from ociworker.ops.context import ContextChecksums
from ociworker.ops.parts import OpParts
from ociworker.ops.registry import OpResolver
from ociworker.ops.runmount.cache import CacheMounts
from ociworker.registry.client import RegistryClient
from ociworker.snapshot import open_snapshotter
from ociworker.snapshot.base import Mounter, SnapshotStore
from ociworker.solver.scheduler import Result, Solver
from ociworker.sources.git import GitFetcher
from ociworker.sources.image import ImagePuller

if TYPE_CHECKING:
    from ociworker.diff.apply import LayerApplier
    from ociworker.diff.compare import LayerComparer
    from ociworker.executor.runtime import OCIRuntimeExecutor

_log = get_logger("ociworker.recovery")

T = TypeVar("T")

#: processes a RUN step may have at once unless the config says otherwise:
#: far above what a build needs, low enough that a fork bomb stays a step's problem
DEFAULT_STEP_PIDS = 16384


@dataclass(frozen=True)
class WorkerConfig:
    root: Path = Path(DEFAULT_ROOT)
    runtime: str = "runc"
    snapshotter: Literal["auto", "overlayfs", "native"] = "auto"
    insecure_registries: tuple[str, ...] = ()
    #: registry domain (``host:port`` or ``host``) -> CA files trusted for it
    #: (``--registry-ca``, buildkitd's ``[registry."host"] ca``)
    registry_ca: tuple[tuple[str, tuple[str, ...]], ...] = ()
    max_parallelism: int | None = None
    #: the ``default`` network's IPv4 subnet ("" = a free /24 of 100.64.0.0/10)
    network_subnet: str = ""
    #: nameservers for steps' /etc/resolv.conf ("" = the host's, localhost ones replaced)
    dns: tuple[str, ...] = ()
    #: entitlements a build may ask for with --allow: both for the embedded
    #: worker (its user is the operator); a daemon grants only what its config lists
    entitlements: tuple[str, ...] = ENTITLEMENTS
    platform: Platform = field(default_factory=lambda: host_platform())
    #: limits of every RUN step's cgroup (None: none): bytes of memory, processes,
    #: CPUs (1.5 = one and a half). A build's --ulimit/--shm-size stay below them.
    step_memory: int | None = None
    step_pids: int | None = DEFAULT_STEP_PIDS
    step_cpus: float | None = None
    #: whether git sources may be file:// URLs, which read the worker's own disk:
    #: yes for the embedded worker (its user owns the disk), no for a daemon's clients
    git_file_urls: bool = True

    def step_limits(self) -> StepLimits:
        return StepLimits(memory=self.step_memory, pids=self.step_pids, cpus=self.step_cpus)


def host_platform() -> Platform:
    return Platform.parse(os.uname().machine)


@dataclass(eq=False)
class Worker:
    """The parts of one state dir, wired together. ``open_worker`` builds the
    real ones; tests may pass fakes (or ``dataclasses.replace`` a few)."""

    config: WorkerConfig
    _: KW_ONLY
    content: ContentStore
    snapshots: SnapshotStore
    registry: RegistryClient
    images: ImageStore
    cache: SQLiteCacheIndex
    layers: SQLiteLayerCache
    mounter: Mounter
    cache_mounts: CacheMounts
    solver: Solver
    comparer: Comparer
    applier: Applier
    executor: RecoverableExecutor
    root: Path = field(init=False)
    #: mount points and scratch copies; emptied by ``recover``
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.config.root.absolute()
        self.tmp = self.root / "tmp"

    async def aclose(self) -> None:
        # The executor's default network (bridge, namespaces, nft tables) goes
        # with the worker; fakes have nothing to close.
        close = getattr(self.executor, "aclose", None)
        if close is not None:
            await close()
        await self.registry.aclose()
        self.cache.close()
        self.layers.close()

    async def recover(self) -> dict[str, int]:
        """Make the root consistent after an unclean stop (a daemon killed with
        SIGKILL); counts of what was found. Whoever holds the root's lock calls it
        before the first build: containers are killed first, then everything
        below the root is unmounted, then scratch dirs are emptied, and only then
        are the active snapshots dropped (a mounted snapshot cannot be removed)."""
        by_executor = await self.executor.recover()
        mounts = await asyncio.to_thread(unmount_below, self.root)
        await asyncio.to_thread(empty_dir, self.tmp)
        active = await self.snapshots.recover()
        found = {
            "containers": by_executor["containers"],
            "mounts": by_executor["mounts"] + mounts,
            "active_snapshots": active,
        }
        if any(found.values()):
            _log.warning("recovered state left by an unclean stop", **found)
        return found


def open_worker(config: WorkerConfig, *, registry: RegistryClient | None = None) -> Worker:
    """The worker on ``config.root`` with the real parts (``registry``: another
    client, e.g. on a fake registry's transport)."""
    # A runtime that is not there fails the command now, before the state dir
    # is touched, not at the first RUN.
    find_runtime(config.runtime)
    root = config.root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    content = ContentStore(root / "content")
    snapshots = open_snapshotter(root / "snapshots", config.snapshotter)
    if registry is None:
        registry = RegistryClient(insecure=config.insecure_registries, ca=dict(config.registry_ca))
    mounter = HostMounter(tmp)
    executor = _LazyExecutor(root / "executor", config)
    applier = _LazyApplier(functools.partial(_applier, content, tmp))
    layers = SQLiteLayerCache(root / "cache.db")
    cache_mounts = CacheMounts(root / "cachemounts")

    async def valid(result: Result) -> bool:
        if result.kind == "snapshot":
            return await snapshots.stat(result.ref) is not None
        # local sources are re-read every build; their content is in the keys of
        # the steps that use them
        return result.kind == "none"

    cache = SQLiteCacheIndex(root / "cache.db", validate=valid)
    # leases of builds whose process died (a crash, SIGKILL) are released now
    cache.held_since()
    parts = OpParts(
        content=content,
        snapshots=snapshots,
        catalog=snapshots,
        mounter=mounter,
        executor=executor,
        applier=applier,
        registry=registry,
        puller=ImagePuller(registry, content),
        layers=layers,
        cache_mounts=cache_mounts,
        scratch=tmp,
        checksums=ContextChecksums(),
        platform=config.platform,
        step_limits=config.step_limits(),
        entitlements=config.entitlements,
        http_state=root / "http",
        git=GitFetcher(root / "git", allow_file=config.git_file_urls),
    )
    return Worker(
        config,
        content=content,
        snapshots=snapshots,
        registry=registry,
        images=ImageStore(root / "images"),
        cache=cache,
        layers=layers,
        mounter=mounter,
        cache_mounts=cache_mounts,
        solver=Solver(OpResolver.from_parts(parts), cache, config.max_parallelism),
        comparer=_LazyComparer(functools.partial(_comparer, content, tmp)),
        applier=applier,
        executor=executor,
    )


# The runtime driver and the differ (tar, gzip, zstd) are imported on first use
# only: a fully cached build needs neither, and start-up is most of their cost.


class _Lazy(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make

    @functools.cached_property
    def real(self) -> T:
        return self._make()


class _LazyExecutor(_Lazy["OCIRuntimeExecutor"]):
    def __init__(self, state_dir: Path, config: WorkerConfig) -> None:
        def make() -> OCIRuntimeExecutor:
            from ociworker.executor.runtime import OCIRuntimeExecutor

            return OCIRuntimeExecutor(
                state_dir, config.runtime, subnet=config.network_subnet, dns=config.dns
            )

        super().__init__(make)
        self._state_dir = state_dir

    async def run(
        self,
        rootfs: Sequence[Mount],
        process: ProcessSpec,
        mounts: Sequence[Mount],
        output: OutputSink,
    ) -> int:
        return await self.real.run(rootfs, process, mounts, output)

    async def aclose(self) -> None:
        if "real" in self.__dict__:  # never made: nothing to close
            await self.real.aclose()

    def prepare(self, network: NetworkMode) -> None:
        if network == "default":  # the others need nothing made ahead
            # A runtime that cannot be found is the step's error to report.
            with contextlib.suppress(OciworkerError):
                self.real.prepare(network)

    async def recover(self) -> dict[str, int]:
        # Without the runtime binary: a state dir may hold containers of a runtime
        # other than the configured one, and recovery must not need either.
        from ociworker.executor.runtime import recover_state_dir

        return await recover_state_dir(self._state_dir)


class _LazyApplier(_Lazy["LayerApplier"]):
    async def apply(self, layer: Descriptor, mounts: Sequence[Mount]) -> Digest:
        return await self.real.apply(layer, mounts)


class _LazyComparer(_Lazy["LayerComparer"]):
    async def compare(
        self, lower: Sequence[Mount], upper: Sequence[Mount], opts: CompressionOpts
    ) -> Layer:
        return await self.real.compare(lower, upper, opts)


def _applier(content: ContentStore, scratch_dir: Path) -> LayerApplier:
    from ociworker.diff.apply import LayerApplier

    return LayerApplier(content, scratch_dir=scratch_dir)


def _comparer(content: ContentStore, scratch_dir: Path) -> LayerComparer:
    from ociworker.diff.compare import LayerComparer

    return LayerComparer(content, scratch_dir=scratch_dir)
