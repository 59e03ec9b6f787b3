"""The composition root: ``open_worker`` picks the concrete parts for a
``WorkerConfig`` and wires them into a ``Worker``; nothing else chooses a
snapshotter, executor, differ or registry client. The op handlers are in
``ociworker.ops``; a ``Worker`` built from its parts (fakes, in the unit tests)
is what the controller, the exporters and the API use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from ociworker.cachedb.filehashes import SQLiteFileHashes
from ociworker.cachedb.history import SQLiteHistory
from ociworker.cachedb.records import SQLiteCacheIndex
from ociworker.content.store import ContentStore
from ociworker.core.build import DEFAULT_ROOT as DEFAULT_ROOT
from ociworker.core.digest import Digest
from ociworker.core.entitlements import ENTITLEMENTS
from ociworker.core.history import DEFAULT_MAX_AGE, DEFAULT_MAX_ENTRIES
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
from ociworker.executor.binary import default_runtime as default_runtime
from ociworker.executor.binary import find_runtime as find_runtime  # the CLI checks --runtime first
from ociworker.executor.owners import Owner, live_owners, recover_dead
from ociworker.exporter.imagestore import ImageStore
from ociworker.exporter.layercache import SQLiteLayerCache
from ociworker.fs.mount import HostMounter, mountpoints_under, unmount
from ociworker.log import get_logger
from ociworker.ops.context import ContextChecksums
from ociworker.ops.parts import OpParts
from ociworker.ops.registry import OpResolver
from ociworker.ops.runmount.cache import CacheMounts
from ociworker.registry.client import RegistryClient
from ociworker.snapshot import open_snapshotter
from ociworker.snapshot.base import Mounter, SnapshotStore
from ociworker.snapshot.dirstore import DirSnapshotter
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
    runtime: str = field(default_factory=default_runtime)
    snapshotter: Literal["auto", "overlayfs", "fuse-overlayfs", "native"] = "auto"
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
    #: build history kept (``history ls``): at most this many records, none older
    #: than this many seconds (0 = no limit), BuildKit's history defaults
    history_max_entries: int = DEFAULT_MAX_ENTRIES
    history_max_age: float = DEFAULT_MAX_AGE

    def step_limits(self) -> StepLimits:
        return StepLimits(memory=self.step_memory, pids=self.step_pids, cpus=self.step_cpus)


def host_platform() -> Platform:
    return Platform.parse(os.uname().machine)


#: the build history's store, as the API names it (it may not import cachedb)
HistoryStore = SQLiteHistory


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
    #: this process's claim on the root (``executor.owners``); None for fakes
    owner: Owner | None = None
    #: the build history (``history ls``); None: not recorded (fakes)
    history: SQLiteHistory | None = None
    #: the handlers' context checksums (their per-file memo serves the history's
    #: record of which files a step's key covered, without reading them again)
    checksums: ContextChecksums = field(default_factory=ContextChecksums)
    root: Path = field(init=False)
    #: mount points and scratch copies of this process (``<root>/tmp/<owner>``)
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.config.root.absolute()
        self.tmp = _scratch_dir(self.root, self.owner)

    async def aclose(self) -> None:
        # The executor's default network (bridge, namespaces, nft tables) goes
        # with the worker; fakes have nothing to close.
        close = getattr(self.executor, "aclose", None)
        if close is not None:
            await close()
        await self.registry.aclose()
        # the snapshotter keeps its metadata connection open (fakes have none)
        close_snapshots = getattr(self.snapshots, "close", None)
        if close_snapshots is not None:
            close_snapshots()
        self.cache.close()
        self.layers.close()
        self.checksums.close()
        if self.history is not None:
            self.history.close()
        if self.owner is not None:
            # Last: once released, a later worker would take all named after it for dead.
            await asyncio.to_thread(_remove_scratch, self.tmp)
            left = await asyncio.to_thread(_left_behind, self.root, self.owner.ident)
            self.owner.release(left_behind=left)

    async def recover(self) -> dict[str, int]:
        """Make the root consistent after an unclean stop (a daemon killed with
        SIGKILL); counts of what was found. The daemon, which holds the root's
        lock, calls it before the first build. What dead worker processes left
        is theirs alone and goes whatever else runs (``open_worker`` did it
        already; the executor's pass catches one that died since). The sweep
        of the whole root (mounts the snapshotter made, scratch dirs of no
        owner, active snapshots) runs only when no other worker process (an
        embedded build) is alive on this root: their mounts and snapshots are
        indistinguishable from a dead process's. Containers first, then
        mounts, then scratch dirs, and only then snapshots (a mounted
        snapshot cannot be removed)."""
        by_executor = await self.executor.recover()
        # Listed before the live owners are: a process that mounted anything
        # listed here had claimed its id before, so it is seen alive below.
        points = await asyncio.to_thread(mountpoints_under, self.root)
        live = set(await asyncio.to_thread(live_owners, _owners_dir(self.root)))
        mine = {self.owner.ident} if self.owner is not None else set()
        mounts, active = 0, 0
        if live <= mine:
            base = os.path.realpath(self.root)
            mounts = await asyncio.to_thread(_unmount_points, [p for p in points if p != base])
            active = await self.snapshots.recover()
        await asyncio.to_thread(_remove_unowned_scratch, self.root)
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
    (root / "tmp").mkdir(exist_ok=True)
    # Claimed before recovering, so a worker starting at the same moment sees
    # this one alive; then what dead ones left goes (``executor.owners``).
    owner = Owner.claim(_owners_dir(root))
    try:
        # In a thread of its own: open_worker may be called on a running event
        # loop, where pyroute2's synchronous calls (the network's teardown) fail.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            recovering = pool.submit(
                recover_dead, _owners_dir(root), functools.partial(_recover_owner, root)
            )
            recovering.result()
        tmp = _scratch_dir(root, owner)
        tmp.mkdir()
        return _open_worker(config, root, tmp, owner, registry)
    except BaseException:
        owner.release()
        raise


def _open_worker(
    config: WorkerConfig, root: Path, tmp: Path, owner: Owner, registry: RegistryClient | None
) -> Worker:
    content = ContentStore(root / "content", owner=owner.ident)
    snapshots = open_snapshotter(root / "snapshots", config.snapshotter)
    snapshots.owner = owner.ident
    if registry is None:
        registry = RegistryClient(insecure=config.insecure_registries, ca=dict(config.registry_ca))
    mounter = HostMounter(tmp)
    executor = _LazyExecutor(root / "executor", config, owner.ident)
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
    # a new process per embedded build: the context's file hashes are kept on disk
    checksums = ContextChecksums(SQLiteFileHashes(root / "filehashes.db"))
    # leases of builds whose process died (a crash, SIGKILL) are released now
    cache.held_since()
    comparer = _LazyComparer(functools.partial(_comparer, content, tmp))
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
        checksums=checksums,
        platform=config.platform,
        step_limits=config.step_limits(),
        entitlements=config.entitlements,
        http_state=root / "http",
        git=GitFetcher(root / "git", allow_file=config.git_file_urls),
        comparer=comparer,
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
        comparer=comparer,
        applier=applier,
        executor=executor,
        owner=owner,
        checksums=checksums,
        history=SQLiteHistory(
            root / "history.db", config.history_max_entries, config.history_max_age
        ),
    )


def _owners_dir(root: Path) -> Path:
    return root / "executor" / "owners"


def _scratch_dir(root: Path, owner: Owner | None) -> Path:
    """Mount points and scratch copies of one worker process: named after its
    owner id, so what a killed one left is told from a live one's."""
    return root / "tmp" / owner.ident if owner is not None else root / "tmp"


def _recover_owner(root: Path, ident: str) -> None:
    """Everything the dead worker process ``ident`` left on ``root``."""
    # Imported here: the runtime driver is loaded on first use only (below),
    # and most starts find no dead owner.
    from ociworker.executor.runtime import recover_owner

    found = recover_owner(root / "executor", ident)
    scratch = root / "tmp" / ident
    found["mounts"] += len(mountpoints_under(scratch))
    unmount(scratch)
    _remove_scratch(scratch)
    # Once nothing of it is mounted: its snapshots in use and its unfinished
    # blobs (the tree layout and the store's are the same for every snapshotter).
    if (root / "snapshots" / "metadata.db").exists():
        found["snapshots"] = DirSnapshotter(root / "snapshots").drop_owned(ident)
    if (root / "content").is_dir():
        found["ingests"] = ContentStore(root / "content").drop_ingests(ident)
    if any(found.values()):
        _log.warning("recovered what a killed worker process left", owner=ident, **found)


def _left_behind(root: Path, ident: str) -> bool:
    """Whether anything named after owner ``ident`` is still on ``root`` (a
    cleanup that failed), for the next start to remove."""
    named = f"ociw-{ident}-*"
    executor = root / "executor"
    return (
        (root / "tmp" / ident).exists()
        or any(executor.glob(f"bundles/{named}"))
        or any(executor.glob(f"netns/{named}"))
    )


def _unmount_points(points: Sequence[str]) -> int:
    for point in reversed(points):
        unmount(Path(point))
    return len(points)


def _remove_scratch(d: Path) -> None:
    """Remove a scratch dir, unless something is still mounted below it: rmtree
    would then delete the contents of a snapshot."""
    if d.is_dir() and not mountpoints_under(d):
        shutil.rmtree(d, ignore_errors=True)


def _remove_unowned_scratch(root: Path) -> None:
    """Unmount and remove what ``<root>/tmp`` holds but the scratch dirs of
    claimed owners. By lock file, not by a list of live owners made earlier: a
    process claims its id before it makes its scratch dir, and a dead one's
    lock file goes only once its scratch dir has gone."""
    owners, tmp = _owners_dir(root), root / "tmp"
    for entry in list(tmp.iterdir()) if tmp.is_dir() else []:
        if (owners / f"{entry.name}.lock").exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            unmount(entry)
            _remove_scratch(entry)
        else:
            entry.unlink(missing_ok=True)


# The runtime driver and the differ (tar, gzip, zstd) are imported on first use
# only: a fully cached build needs neither, and start-up is most of their cost.


class _Lazy(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make

    @functools.cached_property
    def real(self) -> T:
        return self._make()


class _LazyExecutor(_Lazy["OCIRuntimeExecutor"]):
    def __init__(self, state_dir: Path, config: WorkerConfig, owner: str) -> None:
        def make() -> OCIRuntimeExecutor:
            from ociworker.executor.runtime import OCIRuntimeExecutor

            return OCIRuntimeExecutor(
                state_dir, config.runtime, subnet=config.network_subnet, dns=config.dns, owner=owner
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
