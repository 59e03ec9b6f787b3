"""Builds: Dockerfile -> plan -> solve -> export. Owns one build end to end."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ociworker.core.build import (
    CACHE_MOUNT_TYPE,
    BuildDefinition,
    BuildRequest,
    BuildResult,
    PruneFilter,
    UsageRecord,
)
from ociworker.core.graph import SourceOp, Vertex
from ociworker.core.oci import (
    ANNOTATION_STEP_INDEX,
    ANNOTATION_UNCOMPRESSED,
    ANNOTATION_VERTEX_DIGEST,
    ANNOTATION_VERTEX_NAME,
    Descriptor,
    Layer,
)
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import (
    EventSink,
    Info,
    LayerCommitted,
    VertexStatus,
    Warning,
    cap_logs,
    discard,
)
from ociworker.core.reference import parse_reference
from ociworker.core.session import (
    Credentials,
    NoCredentials,
    NoSecrets,
    NoSSH,
    Secrets,
    SSHAgents,
)
from ociworker.diff.base import Compression, CompressionOpts
from ociworker.errors import (
    ConfigError,
    DockerfileError,
    OciworkerError,
    UserError,
)
from ociworker.exporter.image import ImageResult, read_image, write_image
from ociworker.exporter.target import ExportTarget, LocalExportTarget
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, Plan, convert
from ociworker.frontend.dockerfile.parser import parse
from ociworker.fs.atomic import write_atomic
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.ops.runmount.cache import CacheUsage
from ociworker.solver.scheduler import Job, Result
from ociworker.sources.image import LAYER_SNAPSHOT_PREFIX
from ociworker.worker import LocalContext, Worker

#: diffIDs of a tar with no entries (Go's writer pads to 2 blocks, Python's to a record)
_EMPTY_TAR_DIFF_IDS = frozenset(
    "sha256:" + hashlib.sha256(b"\0" * n).hexdigest() for n in (1024, 10240)
)


class _Exporting:
    """A pseudo-step in the progress stream for the export phase."""

    def __init__(self, events: EventSink, name: str) -> None:
        self.events = events
        self.name = name
        self.digest = "export:" + uuid.uuid4().hex
        self.started = time.time()

    def __enter__(self) -> _Exporting:
        self.events(VertexStatus(self.digest, self.name, started=self.started))
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.events(
            VertexStatus(
                self.digest,
                self.name,
                started=self.started,
                completed=time.time(),
                error=str(exc) if exc else None,
            )
        )


async def plan_build(
    worker: Worker,
    req: BuildRequest,
    definition: BuildDefinition,
    events: EventSink = discard,
    credentials: Credentials | None = None,
) -> Plan:
    with _Exporting(events, "[internal] load build definition from Dockerfile"):
        parsed = parse(definition.dockerfile, definition.filename)
    opts = Options(
        build_args=dict(req.build_args),
        target=req.target,
        platform=worker.config.platform,
        network=req.network,
        ignore_patterns=definition.ignore_patterns,
        filename=definition.filename,
        no_cache=req.no_cache,
    )
    images: dict[str, ImageInfo] = {}
    for _ in range(16):  # each round resolves the bases the previous one found
        plan = convert(parsed, opts, images)
        if not plan.missing:
            break
        hints = dict(plan.from_errors)
        with _Exporting(events, "[internal] load metadata for " + ", ".join(plan.missing)):
            got = await asyncio.gather(
                *(resolve_image(worker, m, credentials) for m in plan.missing),
                return_exceptions=True,
            )
        for name, info in zip(plan.missing, got, strict=True):
            if isinstance(info, OciworkerError) and name in hints:
                # ``COPY --from=name`` where name is no stage: most likely a typo of a
                # stage name, which the registry's "not found" would hide.
                raise hints[name] from info
            if isinstance(info, BaseException):
                raise info
            images[name] = info
    else:
        raise DockerfileError("base images could not be resolved (too many rounds)")
    for w in plan.warnings:
        events(Warning(w))
    return plan


async def resolve_image(
    worker: Worker, name: str, credentials: Credentials | None = None
) -> ImageInfo:
    """Pin a FROM reference to a manifest digest: the image store first, then the registry."""
    ref = parse_reference(name)
    repo = ref.repository
    if ref.digest is None:
        local = worker.images.get(str(ref))
        if local is not None:
            _, config = read_image(worker.content, local.digest)
            return ImageInfo(ref=f"{repo}@{local.digest}", config=config)
    registry = worker.registry.with_credentials(credentials)
    resolved = await registry.resolve(ref, worker.config.platform, store=worker.content)
    config = json.loads(resolved.config_json)
    return ImageInfo(ref=f"{repo}@{resolved.manifest.digest}", config=config)


async def build(
    worker: Worker,
    req: BuildRequest,
    definition: BuildDefinition,
    events: EventSink = discard,
    *,
    credentials: Credentials | None = None,
    target: ExportTarget | None = None,
    secrets: Secrets | None = None,
    ssh: SSHAgents | None = None,
) -> BuildResult:
    """Plan, solve and export ``req``; every output is handed to ``target``
    (default: written to the local filesystem, ``dest=-`` to stdout).
    ``credentials``: the registry credentials the caller lends this build
    (anonymous when None; the CLI passes its docker config); ``secrets`` and
    ``ssh`` serve ``RUN --mount=type=secret|ssh`` (none by default)."""
    events = cap_logs(events, req.log_cap)
    if target is None:
        target = LocalExportTarget()
    outputs = list(req.outputs)
    if sum(o.to_stdout for o in outputs) > 1:
        raise ConfigError("only one output can be written to stdout (dest=-)")
    compression = _compression(outputs)
    credentials = credentials or NoCredentials()
    plan = await plan_build(worker, req, definition, events, credentials)
    matcher = IgnoreMatcher(definition.ignore_patterns)
    layer_outs = [o for o in outputs if o.type == "layers"]
    streamer: _LayerStreamer | None = None
    if layer_outs:
        streamer = _LayerStreamer(worker, plan.target, layer_outs, compression, target, events)
    job = Job(
        id=uuid.uuid4().hex,
        events=events,
        no_cache=req.no_cache,
        locals={"context": LocalContext(req.context.absolute(), matcher)},
        credentials=credentials,
        on_result=streamer.on_result if streamer is not None else None,
        secrets=secrets if secrets is not None else NoSecrets(),
        ssh=ssh if ssh is not None else NoSSH(),
    )
    solving = asyncio.ensure_future(worker.solver.solve(plan.target, job))
    if streamer is not None:
        # A layer that cannot be written fails the build now, not when the solve ends.
        streamer.on_failure = solving.cancel
    try:
        result = await solving
        if streamer is not None:
            await streamer.wait()
    except BaseException as exc:
        if streamer is not None:
            await streamer.cancel()
            me = asyncio.current_task()
            ours = me is None or me.cancelling() == 0  # not a Ctrl-C of the whole build
            if isinstance(exc, asyncio.CancelledError) and streamer.error is not None and ours:
                raise streamer.error from None
        raise
    top = result.ref if result.kind == "snapshot" else None

    need_image = bool(req.tags) or any(o.type in ("image", "oci", "docker") for o in outputs)
    need_image = need_image or req.iidfile is not None or req.metadata_file is not None
    need_image = need_image or req.want_image
    image: ImageResult | None = None
    if need_image:
        with _Exporting(events, "exporting layers"):
            image = await _make_image(worker, plan, top, compression, outputs)
        names = [str(parse_reference(t)) for t in req.tags]
        for name in names:
            worker.images.put(name, image.manifest)
    metadata: dict[str, Any] = {}
    if image is not None:
        metadata = {
            "containerimage.digest": image.manifest.digest,
            "containerimage.config.digest": image.config.digest,
            "containerimage.descriptor": image.manifest.to_json(),
        }
        if req.tags:
            metadata["image.name"] = ",".join(str(parse_reference(t)) for t in req.tags)
    for out in outputs:
        await _export(worker, out, image, top, req.tags, events, target)
    if req.iidfile is not None and image is not None:
        write_atomic(req.iidfile, image.config.digest.encode())
    if req.metadata_file is not None:
        write_atomic(req.metadata_file, json.dumps(metadata, indent=2).encode() + b"\n")
    return BuildResult(
        manifest=image.manifest if image else None,
        config_digest=image.config.digest if image else None,
        metadata=metadata,
    )


def _compression(outputs: Sequence[OutputSpec]) -> CompressionOpts:
    comp = "gzip"
    level: int | None = None
    oci = True
    for o in outputs:
        if o.get("compression"):
            comp = o.get("compression")
        if o.get("compression-level"):
            try:
                level = int(o.get("compression-level"))
            except ValueError:
                raise ConfigError("compression-level must be an integer") from None
        if o.type == "docker" and o.get("oci-mediatypes", "false") != "true":
            oci = False
        if o.get("oci-mediatypes") == "true":
            oci = True
    if comp not in ("gzip", "zstd", "uncompressed"):
        raise ConfigError(f"unknown compression {comp!r}: use gzip, zstd or uncompressed")
    if comp == "zstd":
        oci = True
    c: Compression = comp  # type: ignore[assignment]
    return CompressionOpts(compression=c, level=level, oci_media_types=oci)


async def _make_image(
    worker: Worker,
    plan: Plan,
    top: str | None,
    opts: CompressionOpts,
    outputs: Sequence[OutputSpec],
) -> ImageResult:
    chain = await worker.snapshot_chain(top)
    base_n = plan.base_layers
    ours = plan.config["history"][len(plan.base_history) :]
    layer_steps = [h for h in ours if not h.get("empty_layer")]
    if len(chain) != base_n + len(layer_steps):
        raise UserError(
            f"internal: {len(chain)} snapshots for {base_n} base layers and "
            f"{len(layer_steps)} steps"
        )
    layers: list[Layer] = list(
        await asyncio.gather(*(worker.layer_of(chain, i, opts) for i in range(len(chain))))
    )
    kept: list[Layer] = layers[:base_n]
    for layer, entry in zip(layers[base_n:], layer_steps, strict=True):
        if layer.diff_id in _EMPTY_TAR_DIFF_IDS:
            entry["empty_layer"] = True  # BuildKit drops layers that change nothing
        else:
            kept.append(layer)
    now = _rfc3339(time.time())
    config = dict(plan.config)
    history = _base_history(list(plan.base_history), base_n) + [dict(h, created=now) for h in ours]
    config["history"] = history
    config["created"] = now
    inner = dict(config.get("config") or {})
    maint = inner.pop("_maintainer", None)
    if maint:
        config["author"] = maint
    config["config"] = inner
    return await asyncio.to_thread(
        write_image, worker.content, config, kept, oci_media_types=opts.oci_media_types
    )


def _base_history(history: list[dict[str, Any]], layers: int) -> list[dict[str, Any]]:
    """Make the base image's history name exactly its layers (some images have none)."""
    non_empty = sum(1 for h in history if not h.get("empty_layer"))
    for _ in range(layers - non_empty):
        history.append({"created_by": "(layer of the base image without history)"})
    return history


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


async def _export(
    worker: Worker,
    out: OutputSpec,
    image: ImageResult | None,
    top: str | None,
    tags: Sequence[str],
    events: EventSink,
    target: ExportTarget,
) -> None:
    names = [out.get("name")] if out.get("name") else list(tags)
    names = [str(parse_reference(n)) for n in names]
    if out.type == "image":
        assert image is not None
        for n in names:
            worker.images.put(n, image.manifest)
        return
    if out.type == "layers":
        return  # written step by step while the build ran
    # Exporters load only when a build has an output to write.
    from ociworker.exporter.archive import export_docker_archive, export_oci_archive
    from ociworker.exporter.fs import export_tar

    if out.type in ("oci", "docker"):
        assert image is not None
        fn = export_oci_archive if out.type == "oci" else export_docker_archive
        label = "oci image format" if out.type == "oci" else "docker image format"
        with _Exporting(events, f"exporting to {label}"):
            events(Info(f"writing image {image.manifest.digest}"))

            def write() -> None:
                with target.archive(out) as f:
                    fn(worker.content, image, names, f)

            await asyncio.to_thread(write)
        return
    with _Exporting(
        events, f"exporting to client {'directory' if out.type == 'local' else 'tarball'}"
    ):
        async with worker.view(top) as root:
            if out.type == "local":
                await asyncio.to_thread(target.local, out, root)
            else:

                def write_tar() -> None:
                    with target.archive(out) as f:
                        export_tar(root, f)

                await asyncio.to_thread(write_tar)


class _LayerStreamer:
    """Writes the layer of each step of the final stage's chain to the ``layers``
    outputs as soon as the step's snapshot is known, while the build goes on.

    The chain is the target vertex and its input 0 (the root a RUN or COPY edits)
    down to the base image or scratch; step index 1 is the lowest step built on
    the base. Base image layers are not written (they come from a registry
    already); a step that changed nothing makes no layer (BuildKit drops it from
    the image too). A cache hit skips its inputs entirely, so the hit writes the
    layers of the steps below it as well.
    """

    def __init__(
        self,
        worker: Worker,
        target_vertex: Vertex | None,
        outs: Sequence[OutputSpec],
        opts: CompressionOpts,
        target: ExportTarget,
        events: EventSink,
    ) -> None:
        self._worker = worker
        self._outs = list(outs)
        self._opts = opts
        self._target = target
        self._events = events
        steps: list[Vertex] = []
        v = target_vertex
        while v is not None and not isinstance(v.op, SourceOp):
            steps.append(v)
            v = v.inputs[0] if v.inputs else None
        steps.reverse()
        self._steps = steps
        self._index = {s.digest: i for i, s in enumerate(steps, 1)}
        self._claimed: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        #: the first layer write that failed, and what to call when one does
        self.error: BaseException | None = None
        self.on_failure: Callable[[], object] | None = None

    def on_result(self, vertex: Vertex, result: Result) -> None:
        index = self._index.get(vertex.digest)
        if index is None or result.kind != "snapshot" or index in self._claimed:
            return
        self._claimed.add(index)
        task = asyncio.get_running_loop().create_task(self._write_from(index, result.ref))
        task.add_done_callback(self._done)
        self._tasks.append(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None or self.error is not None:
            return
        self.error = task.exception()
        if self.on_failure is not None:
            self.on_failure()

    async def wait(self) -> None:
        """Wait for every layer write; the first failure cancels the rest."""
        try:
            for task in self._tasks:
                await task
        except BaseException:
            await self.cancel()
            raise

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _write_from(self, index: int, ref: str) -> None:
        chain = await self._worker.snapshot_chain(ref)
        base = len(chain) - index
        if base < 0:
            raise UserError(f"internal: step {index} has only {len(chain)} snapshots below it")
        # Steps below a cache hit were never visited: nobody else will write them.
        below = [i for i in range(1, index) if i not in self._claimed]
        self._claimed.update(below)
        await asyncio.gather(*(self._write(chain, base, i) for i in [*below, index]))

    async def _write(self, chain: Sequence[str], base: int, index: int) -> None:
        layer = await self._worker.layer_of(chain, base + index - 1, self._opts)
        if layer.diff_id in _EMPTY_TAR_DIFF_IDS:
            return
        step = self._steps[index - 1]
        d = layer.descriptor
        annotations = {
            **dict(d.annotations),
            ANNOTATION_UNCOMPRESSED: layer.diff_id,
            ANNOTATION_STEP_INDEX: str(index),
            ANNOTATION_VERTEX_DIGEST: step.digest,
            ANNOTATION_VERTEX_NAME: step.name,
        }
        desc = Descriptor(d.media_type, d.digest, d.size, tuple(sorted(annotations.items())))
        committed = LayerCommitted(desc)
        for out in self._outs:

            def write(out: OutputSpec = out) -> None:
                with self._worker.content.open(desc.digest) as blob:
                    self._target.layer(out, committed, blob)

            await asyncio.to_thread(write)
        # After the write: whoever sees the event finds the files in place.
        self._events(committed)


# --- du / prune ---------------------------------------------------------------------


async def disk_usage(worker: Worker) -> list[UsageRecord]:
    out: list[UsageRecord] = []
    for rec in worker.cache.records():
        if rec.result.kind != "snapshot":
            continue
        size = 0
        with contextlib.suppress(Exception):
            size = await worker.snapshots.usage(rec.result.ref)
        # pulled layers are the snapshots named by ChainID; everything else was built
        kind = "source.image" if rec.result.ref.startswith(LAYER_SNAPSHOT_PREFIX) else "regular"
        out.append(UsageRecord(rec.key, kind, size, rec.description, rec.last_used))
    for cm in await asyncio.to_thread(worker.cache_mounts.usage):
        out.append(_cache_mount_record(cm))
    return out


def _cache_mount_record(cm: CacheUsage) -> UsageRecord:
    return UsageRecord("sha256:" + cm.key, CACHE_MOUNT_TYPE, cm.size, cm.id, cm.last_used)


async def prune_filtered(worker: Worker, flt: PruneFilter) -> tuple[int, int]:
    """Remove the cache mounts ``flt`` selects (records of other types are left
    alone); (removed, bytes freed). A cache mount in use by a step is kept."""
    removed = freed = 0
    for cm in await asyncio.to_thread(worker.cache_mounts.usage):
        if not flt.matches(_cache_mount_record(cm)):
            continue
        size = await asyncio.to_thread(worker.cache_mounts.remove, cm.key)
        if size or not (worker.cache_mounts.root / cm.key).exists():
            removed += 1
            freed += size
    return removed, freed


async def prune(worker: Worker, flt: PruneFilter | None = None) -> tuple[int, int]:
    """Remove every cache record, every committed snapshot, every cache mount and
    every blob no stored image uses; (records, bytes) freed. With a filter, only
    what it selects (see ``PruneFilter``)."""
    if flt is not None and not flt.empty:
        return await prune_filtered(worker, flt)
    removed, freed = await prune_filtered(worker, PruneFilter())
    for rec in worker.cache.records():
        worker.cache.remove(rec.key)
        removed += 1
    # Remove committed snapshots from the leaves down; parents go once childless.
    infos = await worker.snapshots.walk()
    children: dict[str, int] = {}
    for info in infos:
        if info.parent:
            children[info.parent] = children.get(info.parent, 0) + 1
    pending = [i for i in infos if i.kind == "committed"]
    progress = True
    while pending and progress:
        progress = False
        for info in list(pending):
            if children.get(info.key, 0):
                continue
            with contextlib.suppress(Exception):
                freed += await worker.snapshots.usage(info.key)
            await worker.snapshots.remove(info.key)
            worker.layers.forget_layers(info.key)
            pending.remove(info)
            if info.parent:
                children[info.parent] -= 1
            progress = True
    # Blobs referenced by no stored image can go too.
    keep_blobs: set[str] = set()
    for _, desc in worker.images.list():
        keep_blobs.add(desc.digest)
        with contextlib.suppress(Exception):
            manifest, _cfg = read_image(worker.content, desc.digest)
            keep_blobs.add(manifest["config"]["digest"])
            keep_blobs.update(layer["digest"] for layer in manifest.get("layers", []))
    for digest, size in list(worker.content.walk()):
        if digest not in keep_blobs:
            worker.content.delete(digest)
            freed += size
    return removed, freed
