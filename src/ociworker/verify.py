"""``build --verify-cache``: every step of a solved build runs again with the
cache off, in scratch, and its layer is compared with the cached one
(``core.verify`` judges; this is the IO around it).

Scratch, in the same root: a second ``Solver`` over the worker's own
snapshotter, executor and content store (base images are not pulled or
unpacked again), with

- a cache index of its own that lives in memory and is never asked (every step
  runs) — the real index is only read (``records()``, which counts no use);
- empty cache mounts, ``ADD URL`` records and git checkouts under this process's
  scratch dir, as a cold build sees them (the real ones are neither read nor
  changed by what the scratch run does);
- a layer cache in memory, and layers diffed into a content store under the
  scratch dir (uncompressed, read back, deleted).

The snapshots the scratch runs commit are removed when the check ends, and the
scratch dir with them, so the real cache (records, snapshots, layers, cache
mounts) is as the build left it. The build's lease covers the check: a prune or
GC running meanwhile keeps the scratch snapshots until they are removed here.

Why before the export: a false hit fails the build before anything is written
or pushed, so a wrong layer never reaches an image; a clean check exports as a
build without the flag does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import shutil
import tarfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.graph import Vertex
from ociworker.core.oci import Layer
from ociworker.core.progress import (
    Event,
    EventSink,
    Info,
    ProgressStep,
    VertexLog,
    VertexStatus,
    Warning,
)
from ociworker.core.verify import (
    Entry,
    StepCheck,
    StepFiles,
    VerifyReport,
    check_pulled,
    classify,
    failure,
    not_checked,
)
from ociworker.diff.base import Compression, CompressionOpts
from ociworker.errors import CacheVerifyError, OciworkerError
from ociworker.exporter.layercache import SOURCE
from ociworker.ops.parts import OpParts
from ociworker.ops.registry import OpResolver
from ociworker.ops.runmount.cache import CacheMounts
from ociworker.ops.untar import open_decompressed
from ociworker.snapshot import access
from ociworker.solver.scheduler import Job, Result, Solver
from ociworker.sources.git import GitFetcher
from ociworker.sources.image import LAYER_SNAPSHOT_PREFIX, ImagePuller
from ociworker.worker import Worker

if TYPE_CHECKING:
    from ociworker.diff.compare import LayerComparer

#: what a layer is diffed into for comparing (no compression: it is read back once)
_UNCOMPRESSED: Compression = "uncompressed"


class _ScratchIndex:
    """The scratch solver's cache index: never hits (its jobs run with the cache
    off anyway) and remembers what was recorded, to be removed at the end."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    async def lookup(self, key: str) -> Result | None:
        return None

    async def record(self, key: str, result: Result, description: str) -> None:
        self.results.append(result)


class _MemoryLayers:
    """A ``LayerCache`` that forgets: the scratch image sources record their
    pulled layers here, not in the worker's cache.db."""

    def __init__(self) -> None:
        self._layers: dict[tuple[str, str], Layer] = {}

    def get_layer(self, snapshot: str, compression: str) -> Layer | None:
        return self._layers.get((snapshot, compression))

    def put_layer(self, snapshot: str, compression: str, layer: Layer) -> None:
        self._layers[(snapshot, compression)] = layer

    def forget_layers(self, snapshot: str) -> None:
        for k in [k for k in self._layers if k[0] == snapshot]:
            del self._layers[k]

    def put_source(self, digest: str, repository: str) -> None:
        pass

    def source_of(self, digest: str, registry: str) -> str | None:
        return None


def _renamed(events: EventSink, run: int) -> EventSink:
    """A scratch run's progress, shown as steps of their own (``[verify-cache
    run N] [2/3] RUN ...``): the same vertex digest would merge with the
    build's own step in every printer."""
    prefix = f"verify{run}:"
    label = f"[verify-cache run {run}] "

    def sink(ev: Event) -> None:
        if isinstance(ev, VertexStatus):
            events(dataclasses.replace(ev, digest=prefix + ev.digest, name=label + ev.name))
        elif isinstance(ev, VertexLog) or (isinstance(ev, Info) and ev.digest):
            events(dataclasses.replace(ev, digest=prefix + ev.digest))
        elif isinstance(ev, Warning | Info):
            events(ev)

    return sink


class _Scratch:
    """One check's scratch: its solver, its dir, and what it committed."""

    def __init__(self, worker: Worker, job: Job, epoch: int | None) -> None:
        self.worker = worker
        self.job = job
        self.dir = worker.tmp / f"verify-{uuid.uuid4().hex[:12]}"
        self.dir.mkdir(parents=True)
        self.content = ContentStore(self.dir / "layers")
        self.index = _ScratchIndex()
        self.opts = CompressionOpts(_UNCOMPRESSED, epoch=epoch)
        parts = OpParts(
            content=worker.content,
            snapshots=worker.snapshots,
            catalog=worker.snapshots,
            mounter=worker.mounter,
            executor=worker.executor,
            applier=worker.applier,
            registry=worker.registry,
            puller=ImagePuller(worker.registry, worker.content),
            layers=_MemoryLayers(),
            cache_mounts=CacheMounts(self.dir / "cachemounts"),
            scratch=worker.tmp,
            checksums=worker.checksums,
            platform=worker.config.platform,
            step_limits=worker.config.step_limits(),
            entitlements=worker.config.entitlements,
            http_state=self.dir / "http",
            git=GitFetcher(self.dir / "git", allow_file=worker.config.git_file_urls),
        )
        self.solver = Solver(
            OpResolver.from_parts(parts), self.index, worker.config.max_parallelism
        )
        self._files: dict[str, StepFiles] = {}

    async def run(self, target: Vertex, n: int, events: EventSink) -> dict[Digest, Result]:
        """Solve ``target`` with the cache off; each vertex's result."""
        real = self.job
        job = Job(
            id=uuid.uuid4().hex,
            events=_renamed(events, n),
            no_cache=True,
            locals=real.locals,
            secrets=real.secrets,
            ssh=real.ssh,
            credentials=real.credentials,
            entitlements=real.entitlements,
        )
        try:
            await self.solver.solve(target, job)
        except OciworkerError as exc:
            # the build itself succeeded: say this is the check's run, and that
            # nothing was checked (a step may need what only a warm cache holds)
            raise CacheVerifyError(
                f"verify-cache: run {n} without the cache failed, so the cache could not "
                f"be checked; nothing was exported: {exc}"
            ) from exc
        return job.results

    async def files(self, result: Result) -> StepFiles:
        """What is compared of ``result``: its layer's diffID and entries."""
        if result.kind != "snapshot":
            return StepFiles(kind=result.kind)
        got = self._files.get(result.ref)
        if got is None:
            got = self._files[result.ref] = await self._diff(result.ref)
        return got

    async def _diff(self, name: str) -> StepFiles:
        snapshots = self.worker.snapshots
        info = await snapshots.stat(name)
        parent = info.parent if info is not None else None
        upper_key, lower_key = f"verify-{uuid.uuid4().hex}", f"verify-{uuid.uuid4().hex}"
        upper = await snapshots.view(upper_key, name)
        try:
            lower = await snapshots.view(lower_key, parent) if parent is not None else ()
            try:
                layer = await _comparer(self.content, self.dir).compare(lower, upper, self.opts)
            finally:
                if parent is not None:
                    await snapshots.remove(lower_key)
        finally:
            await snapshots.remove(upper_key)
        blob = self.content.blob_path(layer.descriptor.digest)
        try:
            entries = await asyncio.to_thread(read_entries, blob)
        finally:
            self.content.delete(layer.descriptor.digest)
        return StepFiles(diff_id=layer.diff_id, entries=entries)

    async def close(self, before: set[str]) -> None:
        """Remove the snapshots the scratch runs committed (children first: a
        snapshot with children cannot go) and the scratch dir."""
        mine = {r.ref for r in self.index.results if r.kind == "snapshot"} - before
        for _ in range(len(mine) + 1):
            if not mine:
                break
            for name in sorted(mine):
                with contextlib.suppress(Exception):
                    await self.worker.snapshots.remove(name)
                    mine.discard(name)
        await asyncio.to_thread(shutil.rmtree, self.dir, True)


async def _check_pulled(scratch: _Scratch, name: str, ref: str) -> StepCheck:
    """A FROM step's snapshots, each against the layer blob it was unpacked from."""
    worker = scratch.worker
    chain = await access.snapshot_chain(worker.snapshots, ref)
    layers: list[tuple[str, StepFiles, StepFiles]] = []
    for snap in chain:
        layer = worker.layers.get_layer(snap, SOURCE)
        if not snap.startswith(LAYER_SNAPSHOT_PREFIX) or layer is None:
            return not_checked(name, "a snapshot shared with the cache and not a pulled layer")
        digest = layer.descriptor.digest
        if not worker.content.has(digest):
            return not_checked(name, f"the layer blob {digest[:19]} is not in the content store")
        blob = worker.content.blob_path(digest)
        image = StepFiles(
            diff_id=layer.diff_id, entries=await asyncio.to_thread(read_entries, blob)
        )
        layers.append((digest, await scratch.files(Result("snapshot", snap)), image))
    return check_pulled(name, layers)


def _comparer(content: ContentStore, scratch: Path) -> LayerComparer:
    # Imported here: the differ is loaded on first use only (``worker``), and
    # only a build that checks its cache needs a second one.
    from ociworker.diff.compare import LayerComparer

    return LayerComparer(content, scratch_dir=scratch)


_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def read_entries(tar_path: Path) -> dict[str, Entry]:
    """Each path of a layer tar (compressed or not), without its times (``core.verify``)."""
    out: dict[str, Entry] = {}
    with open_decompressed(tar_path) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
        for m in tf:
            kind = _KINDS.get(m.type, "other")
            data = ""
            if kind == "file":
                data = _sha256(tf, m)
            elif kind == "symlink":
                data = m.linkname
            elif kind == "hardlink":  # named as the entries are
                data = m.linkname.removeprefix("./").strip("/")
            elif kind in ("char", "block"):
                data = f"{m.devmajor}:{m.devminor}"
            xattrs = tuple(
                sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr."))
            )
            path = m.name.removeprefix("./").strip("/")
            out[path] = Entry(kind, m.mode, m.uid, m.gid, m.size, data, xattrs)
    return out


def _sha256(tf: tarfile.TarFile, m: tarfile.TarInfo) -> str:
    h = hashlib.sha256()
    f = tf.extractfile(m)
    if f is not None:
        with f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


async def verify_cache(
    worker: Worker,
    target: Vertex | None,
    job: Job,
    events: EventSink,
    *,
    steps: Mapping[str, bool],
    epoch: int | None = None,
) -> VerifyReport:
    """Check every step of ``job``'s solve of ``target`` against runs without the
    cache (see the module doc); the report, after showing it. Raises
    ``CacheVerifyError`` on a false hit; warns of non-deterministic steps.
    ``steps``: the build's steps by digest as it showed them, in order, and
    whether each was taken from the cache; the report follows that order."""
    if target is None:
        return VerifyReport(())
    vertices = list(target.walk())
    # read only: lookup() would count a use of each record
    records = {r.key: r.result for r in worker.cache.records()}
    before = {i.key for i in await worker.snapshots.walk()}
    scratch = _Scratch(worker, job, epoch)
    try:
        first = await scratch.run(target, 1, events)
        report = await _compare(scratch, vertices, records, first, target, events, steps)
    finally:
        await scratch.close(before)
    with ProgressStep(events, "[verify-cache] compare every step with the cache") as step:
        for text in report.lines():
            events(VertexLog(step.digest, 1, (text + "\n").encode(), time.time()))
    if not report.ok:
        raise CacheVerifyError(failure(report))
    warning = report.warning()
    if warning is not None:
        events(Warning(warning))
    return report


async def _compare(
    scratch: _Scratch,
    vertices: list[Vertex],
    records: dict[str, Result],
    first: dict[Digest, Result],
    target: Vertex,
    events: EventSink,
    steps: Mapping[str, bool],
) -> VerifyReport:
    job = scratch.job
    cached: dict[Digest, Result] = {}
    checks: dict[Digest, StepCheck] = {}
    for v in vertices:
        name = v.name or v.digest[:19]
        got = job.results.get(v.digest) or records.get(job.keys.get(v.digest, ""))
        fresh = first.get(v.digest)
        if got is None:
            checks[v.digest] = not_checked(name, "no cached result (its record was pruned)")
        elif fresh is None:
            checks[v.digest] = not_checked(name, "the run without the cache made no result")
        elif got.kind == "dir":
            checks[v.digest] = not_checked(
                name, "a local source: its files are in the keys of the steps that use them"
            )
        elif got.kind not in ("snapshot", "none"):
            checks[v.digest] = not_checked(name, f"a {got.kind} result (not materialized)")
        elif got == fresh and got.kind == "snapshot":
            # one snapshot for both (pulled layers are named by ChainID): its
            # layers are checked against the image's own blobs instead
            checks[v.digest] = await _check_pulled(scratch, name, got.ref)
        else:
            cached[v.digest] = got
    # the first pass: which steps the first run reproduced
    differ = [
        v
        for v in vertices
        if v.digest in cached
        and not (await scratch.files(cached[v.digest])).same_files(
            await scratch.files(first[v.digest])
        )
    ]
    second: dict[Digest, Result] = {}
    if differ:
        second = await scratch.run(target, 2, events)
    nondet: dict[Digest, list[str]] = {}  # vertex -> its non-deterministic ancestors
    for v in vertices:
        inherited = sorted({n for i in v.inputs if i is not None for n in nondet.get(i.digest, [])})
        if v.digest in cached:
            name = v.name or v.digest[:19]
            again = second.get(v.digest)
            check = classify(
                name,
                await scratch.files(cached[v.digest]),
                await scratch.files(first[v.digest]),
                await scratch.files(again) if again is not None else None,
                was_cached=steps.get(v.digest, False),
                nondeterministic_inputs=inherited,
            )
            checks[v.digest] = check
            if check.verdict == "non-deterministic":
                inherited = sorted({*inherited, name})
        nondet[v.digest] = inherited
    # as the build listed them (a step it did not show goes last, in graph order)
    shown = {d: i for i, d in enumerate(steps)}
    ordered = sorted(vertices, key=lambda v: shown.get(v.digest, len(shown)))
    return VerifyReport(tuple(checks[v.digest] for v in ordered))
