"""``--cache-to``: the records of a solved build, written as a cache manifest to a
registry (``type=registry``), an OCI layout directory (``type=local``) or the
image's config (``type=inline``).

``mode=min`` keeps the steps whose results make up the final image's chain of
layers; ``mode=max`` every step of every stage. Local sources are always listed
(as records without layers): they carry nothing, and the steps reading them are
linked through them. A step whose record is gone from the local index (pruned)
is left out, and so is, on import, every step above it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.content.store import ContentStore
from ociworker.core.cacheimport import (
    INLINE_CACHE_KEY,
    OCI_MANIFEST,
    CacheConfig,
    CacheConfigBuilder,
    CacheSpec,
    cache_manifest,
)
from ociworker.core.digest import canonical_json, hex_part, sha256_bytes
from ociworker.core.graph import SourceOp, Vertex
from ociworker.core.oci import Descriptor, Layer
from ociworker.core.progress import EventSink, ProgressStep, Warning
from ociworker.core.reference import parse_reference
from ociworker.diff.base import CompressionOpts
from ociworker.errors import OciworkerError
from ociworker.exporter.chain import ChainLayers, is_empty
from ociworker.exporter.image import ImageResult
from ociworker.exporter.target import write_errors
from ociworker.fs.atomic import write_atomic
from ociworker.registry.client import RegistryClient
from ociworker.remotecache.importer import ImportedLayers, empty_layer_blob
from ociworker.solver.scheduler import REMOTE, Job, Result

#: concurrent blob uploads (Docker's max-concurrent-uploads)
UPLOADS = 5
_OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_REF_NAME = "org.opencontainers.image.ref.name"

#: the local cache index's lookup
LocalLookup = Callable[[str], Awaitable[Result | None]]


@dataclass(frozen=True)
class ExportInputs:
    """What the cache export reads of one solved build."""

    target: Vertex | None
    job: Job
    result: Result
    layers: ChainLayers  # an ``ImportedLayers`` when the build imported
    content: ContentStore
    opts: CompressionOpts


async def collect(
    inputs: ExportInputs,
    mode: str,
    lookup: LocalLookup,
) -> CacheConfig:
    """The records of ``inputs``' build for ``mode`` (min | max). ``lookup``: the
    local cache index's, for steps this build only saw as ancestors of a hit."""
    builder = CacheConfigBuilder()
    target = inputs.target
    if target is None:
        return builder.build()
    job = inputs.job
    top_chain = await inputs.layers.chain(ImportedLayers.top_name(inputs.result))
    top_names = set(top_chain)
    top_layers = [await _layer(inputs, top_chain, i) for i in range(len(top_chain))]
    top_ids = [(la.descriptor.digest, la.diff_id) for la in top_layers]
    for v in target.walk():
        key = job.keys.get(v.digest)
        if key is None:
            continue
        in_keys = [job.keys.get(i.digest, "?") if i is not None else "" for i in v.inputs]
        if isinstance(v.op, SourceOp) and v.op.identifier.startswith("local://"):
            builder.add(key, "dir", in_keys, (), v.name)
            continue
        result = job.results.get(v.digest)
        if result is None:
            # an ancestor of a hit: its record here, or in the cache this build imported
            result = await lookup(key)
            if result is None and job.imported is not None:
                result = await job.imported.lookup(key)
            if result is None:
                continue
        if result.kind == "none":
            builder.add(key, "none", in_keys, (), v.name)
            continue
        if result.kind not in ("snapshot", REMOTE):
            continue
        if mode == "min" and result.kind == "snapshot" and result.ref not in top_names:
            continue
        chain = await inputs.layers.chain(ImportedLayers.top_name(result))
        layers = [await _layer(inputs, chain, i) for i in range(len(chain))]
        if mode == "min" and result.kind == REMOTE:
            ids = [(la.descriptor.digest, la.diff_id) for la in layers]
            if ids != top_ids[: len(ids)]:
                continue
        builder.add(key, "layers", in_keys, layers, v.name)
    return builder.build()


async def _layer(inputs: ExportInputs, chain: Sequence[str], i: int) -> Layer:
    layer = await inputs.layers.layer_of(chain, i, inputs.opts)
    if is_empty(layer) and not inputs.content.has(layer.descriptor.digest):
        # an imported empty layer nobody stored (an inline cache's): made here
        return await asyncio.to_thread(empty_layer_blob, inputs.content, layer)
    return layer


# --- writers --------------------------------------------------------------------------


async def export_caches(
    specs: Sequence[CacheSpec],
    inputs: ExportInputs,
    lookup: LocalLookup,
    registry: RegistryClient,
    events: EventSink,
) -> None:
    """Write every non-inline ``--cache-to``. A failure fails the build unless
    the spec says ``ignore-error=true`` (then it is a warning), as BuildKit."""
    for spec in specs:
        if spec.type == "inline":
            continue
        step = (
            "exporting cache to registry"
            if spec.type == "registry"
            else "exporting cache to client directory"
        )
        try:
            with ProgressStep(events, step):
                config = await collect(inputs, spec.mode, lookup)
                if spec.type == "registry":
                    await _write_registry(spec, config, inputs.content, registry)
                else:
                    with write_errors(f"cannot write cache to {spec.get('dest')}"):
                        await asyncio.to_thread(_write_layout, spec, config, inputs.content)
        except OciworkerError as exc:
            if not spec.ignore_error:
                raise
            events(Warning(f"failed to export cache {spec}: {exc}"))


async def _write_registry(
    spec: CacheSpec, config: CacheConfig, content: ContentStore, registry: RegistryClient
) -> None:
    ref = parse_reference(spec.get("ref"))
    cfg, manifest = cache_manifest(config)
    cfg_digest = sha256_bytes(cfg)
    if not content.has(cfg_digest):
        await asyncio.to_thread(content.put, cfg, cfg_digest)
    descs = [layer.descriptor for layer in config.layers]
    descs.append(Descriptor("application/octet-stream", cfg_digest, len(cfg)))
    sem = asyncio.Semaphore(UPLOADS)

    async def push(desc: Descriptor) -> None:
        async with sem:
            await registry.push_blob(ref, desc, content)

    try:
        async with asyncio.TaskGroup() as tg:
            for desc in {d.digest: d for d in descs}.values():
                tg.create_task(push(desc))
    except ExceptionGroup as group:
        raise group.exceptions[0] from None
    # Blobs first, the manifest last: a reader of the ref sees the old cache or
    # the new one, whole (two writers: the last manifest put wins).
    await registry.push_manifest(ref, OCI_MANIFEST, manifest)


def _write_layout(spec: CacheSpec, config: CacheConfig, content: ContentStore) -> None:
    root = Path(spec.get("dest"))
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    cfg, manifest = cache_manifest(config)
    layout = root / "oci-layout"
    if not layout.exists():
        write_atomic(layout, _OCI_LAYOUT)
    for layer in config.layers:
        path = blobs / hex_part(layer.descriptor.digest)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            try:
                with content.open(layer.descriptor.digest) as src, tmp.open("wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                tmp.rename(path)
            finally:
                tmp.unlink(missing_ok=True)
    for data in (cfg, manifest):
        path = blobs / hex_part(sha256_bytes(data))
        if not path.exists():
            write_atomic(path, data)
    index_path = root / "index.json"
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    others = [
        m
        for m in index.get("manifests") or []
        if isinstance(m, dict) and (m.get("annotations") or {}).get(_REF_NAME) != spec.tag
    ]
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": sha256_bytes(manifest),
        "size": len(manifest),
        "annotations": {_REF_NAME: spec.tag},
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    index["manifests"] = [*others, entry]
    # The index last: a reader sees the old cache or the new one, whole.
    write_atomic(index_path, json.dumps(index, indent=2).encode())


def add_inline_cache(content: ContentStore, image: ImageResult, config: CacheConfig) -> ImageResult:
    """``image`` with ``config`` in its image config (``type=inline``): a new
    config blob and manifest; the layers are the image's own."""
    manifest = json.loads(content.read(image.manifest.digest))
    cfg = json.loads(content.read(image.config.digest))
    cfg = copy.deepcopy(cfg)
    cfg[INLINE_CACHE_KEY] = config.to_json()
    cfg_bytes = canonical_json(cfg)
    cfg_desc = Descriptor(image.config.media_type, sha256_bytes(cfg_bytes), len(cfg_bytes))
    content.put(cfg_bytes, cfg_desc.digest)
    manifest["config"] = cfg_desc.to_json()
    data = canonical_json(manifest)
    desc = Descriptor(image.manifest.media_type, sha256_bytes(data), len(data))
    content.put(data, desc.digest)
    return ImageResult(manifest=desc, config=cfg_desc, layers=image.layers)
