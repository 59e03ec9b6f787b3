"""Builds: Dockerfile -> plan -> solve -> export. Owns one build end to end."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ociworker.cachemounts import CacheUsage
from ociworker.core.digest import Digest
from ociworker.core.oci import Descriptor, Layer
from ociworker.core.progress import EventSink, Info, VertexStatus, Warning, discard
from ociworker.core.reference import parse_reference
from ociworker.core.session import NoSecrets, NoSSH, Secrets, SSHAgents
from ociworker.diff.base import Compression, CompressionOpts
from ociworker.errors import (
    ConfigError,
    DockerfileError,
    NotFoundError,
    OciworkerError,
    UserError,
)
from ociworker.exporter.image import ImageResult, read_image, write_image
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, Plan, convert
from ociworker.frontend.dockerfile.dockerignore import IgnoreMatcher, read_ignore_file
from ociworker.frontend.dockerfile.parser import parse
from ociworker.solver.scheduler import Job
from ociworker.sources.image import LAYER_SNAPSHOT_PREFIX
from ociworker.worker import LocalContext, Worker

#: diffIDs of a tar with no entries (Go's writer pads to 2 blocks, Python's to a record)
_EMPTY_TAR_DIFF_IDS = frozenset(
    "sha256:" + hashlib.sha256(b"\0" * n).hexdigest() for n in (1024, 10240)
)
OUTPUT_TYPES = ("image", "oci", "docker", "local", "tar")


@dataclass(frozen=True)
class OutputSpec:
    type: str
    attrs: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str = "") -> str:
        return dict(self.attrs).get(key, default)

    @classmethod
    def parse(cls, text: str) -> OutputSpec:
        """``type=oci,dest=out.tar`` (as buildx), or a bare path meaning type=local."""
        if "=" not in text and "," not in text:
            return cls("local", (("dest", text),))
        attrs: dict[str, str] = {}
        for part in text.split(","):
            k, eq, v = part.partition("=")
            if not eq:
                raise ConfigError(f"invalid output {text!r}: {part!r} is not key=value")
            attrs[k.strip()] = v.strip()
        typ = attrs.pop("type", "local" if "dest" in attrs else "")
        if typ == "registry":
            raise ConfigError("type=registry is not supported yet; use type=oci and skopeo")
        if typ not in OUTPUT_TYPES:
            raise ConfigError(f"unknown output type {typ!r}: use one of {', '.join(OUTPUT_TYPES)}")
        if typ in ("oci", "docker", "local", "tar") and not attrs.get("dest"):
            raise ConfigError(f"output type={typ} needs dest=PATH")
        return cls(typ, tuple(sorted(attrs.items())))


@dataclass(frozen=True)
class BuildRequest:
    context: Path
    dockerfile: Path | None = None
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str = ""
    outputs: tuple[OutputSpec, ...] = ()
    no_cache: bool = False
    network: str = "host"
    iidfile: Path | None = None
    metadata_file: Path | None = None


@dataclass(frozen=True)
class BuildResult:
    manifest: Descriptor | None
    config_digest: Digest | None
    metadata: dict[str, Any]


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


def _read_dockerfile(req: BuildRequest) -> tuple[str, Path]:
    path = req.dockerfile or req.context / "Dockerfile"
    if not path.is_absolute() and req.dockerfile is not None and not path.exists():
        path = req.context / path
    try:
        return path.read_text(encoding="utf-8"), path
    except FileNotFoundError:
        raise NotFoundError(f"failed to read dockerfile: open {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DockerfileError(f"{path} is not UTF-8 text: {exc}") from None


async def plan_build(
    worker: Worker, req: BuildRequest, events: EventSink = discard
) -> tuple[Plan, IgnoreMatcher]:
    if not req.context.is_dir():
        raise NotFoundError(f"build context {req.context} is not a directory")
    with _Exporting(events, "[internal] load build definition from Dockerfile"):
        text, df_path = _read_dockerfile(req)
        parsed = parse(text, df_path.name)
    patterns = read_ignore_file(req.context, df_path)
    matcher = IgnoreMatcher(patterns)
    opts = Options(
        build_args=dict(req.build_args),
        target=req.target,
        platform=worker.config.platform,
        network=req.network,
        ignore_patterns=tuple(patterns),
        filename=df_path.name,
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
                *(resolve_image(worker, m) for m in plan.missing), return_exceptions=True
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
    return plan, matcher


async def resolve_image(worker: Worker, name: str) -> ImageInfo:
    """Pin a FROM reference to a manifest digest: the image store first, then the registry."""
    ref = parse_reference(name)
    repo = ref.repository
    if ref.digest is None:
        local = worker.images.get(str(ref))
        if local is not None:
            _, config = read_image(worker.content, local.digest)
            return ImageInfo(ref=f"{repo}@{local.digest}", config=config)
    resolved = await worker.registry.resolve(ref, worker.config.platform, store=worker.content)
    config = json.loads(resolved.config_json)
    return ImageInfo(ref=f"{repo}@{resolved.manifest.digest}", config=config)


async def build(
    worker: Worker,
    req: BuildRequest,
    events: EventSink = discard,
    *,
    secrets: Secrets | None = None,
    ssh: SSHAgents | None = None,
) -> BuildResult:
    """``secrets`` and ``ssh`` serve ``RUN --mount=type=secret|ssh`` (none by default)."""
    outputs = list(req.outputs)
    plan, matcher = await plan_build(worker, req, events)
    job = Job(
        id=uuid.uuid4().hex,
        events=events,
        no_cache=req.no_cache,
        locals={"context": LocalContext(req.context.absolute(), matcher)},
        secrets=secrets if secrets is not None else NoSecrets(),
        ssh=ssh if ssh is not None else NoSSH(),
    )
    result = await worker.solver.solve(plan.target, job)
    top = result.ref if result.kind == "snapshot" else None

    compression = _compression(outputs)
    need_image = bool(req.tags) or any(o.type in ("image", "oci", "docker") for o in outputs)
    need_image = need_image or req.iidfile is not None or req.metadata_file is not None
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
        await _export(worker, out, image, top, req.tags, events)
    if req.iidfile is not None and image is not None:
        _write_atomic(req.iidfile, image.config.digest.encode())
    if req.metadata_file is not None:
        _write_atomic(req.metadata_file, json.dumps(metadata, indent=2).encode() + b"\n")
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


@contextlib.contextmanager
def _open_dest(dest: str) -> Iterator[BinaryIO]:
    if dest == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


async def _export(
    worker: Worker,
    out: OutputSpec,
    image: ImageResult | None,
    top: str | None,
    tags: Sequence[str],
    events: EventSink,
) -> None:
    names = [out.get("name")] if out.get("name") else list(tags)
    names = [str(parse_reference(n)) for n in names]
    if out.type == "image":
        assert image is not None
        for n in names:
            worker.images.put(n, image.manifest)
        return
    # Exporters load only when a build has an output to write.
    from ociworker.exporter.archive import export_docker_archive, export_oci_archive
    from ociworker.exporter.fs import export_local, export_tar

    dest = out.get("dest")
    if out.type in ("oci", "docker"):
        assert image is not None
        fn = export_oci_archive if out.type == "oci" else export_docker_archive
        label = "oci image format" if out.type == "oci" else "docker image format"
        with _Exporting(events, f"exporting to {label}"):
            events(Info(f"writing image {image.manifest.digest}"))

            def write() -> None:
                with _open_dest(dest) as f:
                    fn(worker.content, image, names, f)

            await asyncio.to_thread(write)
        return
    with _Exporting(
        events, f"exporting to client {'directory' if out.type == 'local' else 'tarball'}"
    ):
        async with worker.view(top) as root:
            if out.type == "local":
                await asyncio.to_thread(export_local, root, Path(dest))
            else:

                def write_tar() -> None:
                    with _open_dest(dest) as f:
                        export_tar(root, f)

                await asyncio.to_thread(write_tar)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- du / prune ---------------------------------------------------------------------


@dataclass(frozen=True)
class UsageRecord:
    id: str
    type: str
    size: int
    description: str
    last_used: float


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


CACHE_MOUNT_TYPE = "exec.cachemount"


def _cache_mount_record(cm: CacheUsage) -> UsageRecord:
    return UsageRecord("sha256:" + cm.key, CACHE_MOUNT_TYPE, cm.size, cm.id, cm.last_used)


@dataclass(frozen=True)
class PruneFilter:
    """``prune --filter``: ``type=exec.cachemount`` and/or ``id=ID`` (as buildx)."""

    types: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str]) -> PruneFilter:
        types: list[str] = []
        ids: list[str] = []
        for item in items:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not value:
                raise ConfigError(f"invalid prune filter {item!r}: want key=value")
            if key == "type":
                if value != CACHE_MOUNT_TYPE:
                    raise ConfigError(
                        f"prune --filter type={value} is not supported "
                        f"(only type={CACHE_MOUNT_TYPE})"
                    )
                types.append(value)
            elif key == "id":
                ids.append(value)
            else:
                raise ConfigError(f"prune --filter {key}=... is not supported (use type or id)")
        return cls(tuple(types), tuple(ids))

    @property
    def empty(self) -> bool:
        return not self.types and not self.ids

    def matches(self, rec: UsageRecord) -> bool:
        if self.types and rec.type not in self.types:
            return False
        # an id as du shows it (a prefix of the hex) or in full
        hexid = rec.id.removeprefix("sha256:")
        return not self.ids or any(
            i in (rec.id, rec.description) or (len(i) >= 12 and hexid.startswith(i))
            for i in self.ids
        )


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
            worker.cache.forget_layers(info.key)
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
