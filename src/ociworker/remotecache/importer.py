"""``--cache-from``: read cache manifests and answer the solver's ``CacheSource``.

Loading an import reads manifests and the cache config only (a few KiB). A hit
is a lazy result: the solver asks ``materialize`` only when a step that runs
needs it as an input, and the outputs fetch just the blobs of the layers they
write (``ImportedLayers``), never unpacking them. Several imports are asked in
the order given; the first that has a key answers for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ociworker.content.store import ContentStore
from ociworker.core.cacheimport import (
    CACHE_CONFIG_MEDIA_TYPE,
    INLINE_CACHE_KEY,
    CacheConfig,
    CacheRecord,
    CacheSpec,
    config_from_manifest,
)
from ociworker.core.digest import check_digest, hex_part, sha256_bytes
from ociworker.core.oci import Descriptor, Layer, Platform
from ociworker.core.progress import EventSink, ProgressStep, Warning
from ociworker.core.reference import Reference, parse_reference
from ociworker.diff.base import Applier, CompressionOpts
from ociworker.errors import ConfigError, NotFoundError, OciworkerError, RegistryError
from ociworker.exporter.chain import REMOTE_CHAIN, ChainLayers, chain_name, is_empty
from ociworker.exporter.layercache import SOURCE, LayerCache
from ociworker.registry.client import RegistryClient
from ociworker.snapshot.base import SnapshotCatalog, Snapshotter
from ociworker.solver.scheduler import REMOTE, SCRATCH, Result
from ociworker.sources.image import PulledImage, chain_ids, layer_snapshot_name, unpack

_UNCOMPRESSED = "application/vnd.oci.image.layer.v1.tar"


class BlobSource(Protocol):
    """Where the blobs of one imported cache are."""

    @property
    def name(self) -> str: ...

    async def fetch(self, desc: Descriptor, content: ContentStore) -> None:
        """Copy blob ``desc`` into ``content`` (no-op when it is there)."""
        ...


@dataclass(frozen=True)
class RegistryBlobs:
    client: RegistryClient
    ref: Reference
    name: str

    async def fetch(self, desc: Descriptor, content: ContentStore) -> None:
        await self.client.fetch_blob(self.ref, desc, content)


@dataclass(frozen=True)
class LayoutBlobs:
    root: Path
    name: str

    async def fetch(self, desc: Descriptor, content: ContentStore) -> None:
        if content.has(desc.digest):
            return
        path = self.root / "blobs" / "sha256" / hex_part(desc.digest)

        def copy() -> None:
            try:
                f = path.open("rb")
            except OSError as exc:
                raise NotFoundError(
                    f"cache {self.name}: blob {desc.digest} is missing: {exc}"
                ) from None
            with f, content.ingest(expected=desc.digest, expected_size=desc.size) as ingest:
                while chunk := f.read(1 << 20):
                    ingest.write(chunk)
                ingest.commit()

        await asyncio.to_thread(copy)


@dataclass(frozen=True)
class _Found:
    record: CacheRecord
    config: CacheConfig
    blobs: BlobSource


@dataclass(frozen=True)
class ImportParts:
    content: ContentStore
    snapshots: Snapshotter
    catalog: SnapshotCatalog
    applier: Applier
    layers: LayerCache


class CacheImport:
    """The caches one build imports, as the solver's ``CacheSource``."""

    def __init__(self, parts: ImportParts) -> None:
        self._parts = parts
        self._records: dict[str, _Found] = {}
        self._blobs: dict[str, BlobSource] = {}

    def add(self, config: CacheConfig, blobs: BlobSource) -> None:
        """Add one import; keys already known from an earlier one keep their record."""
        for rec in config.records:
            self._records.setdefault(rec.key, _Found(rec, config, blobs))
        for layer in config.layers:
            self._blobs.setdefault(layer.descriptor.digest, blobs)
            if isinstance(blobs, RegistryBlobs):
                # a push to that registry mounts it from the cache's repository
                ref = blobs.ref
                self._parts.layers.put_source(layer.descriptor.digest, f"{ref.domain}/{ref.path}")

    async def fetch_blob(self, desc: Descriptor) -> None:
        """Blob ``desc`` of an imported cache into the content store."""
        source = self._blobs.get(desc.digest)
        if source is None:
            raise NotFoundError(f"blob {desc.digest} is in no imported cache")
        await source.fetch(desc, self._parts.content)

    @property
    def empty(self) -> bool:
        return not self._records

    # -- CacheSource -------------------------------------------------------------

    def knows(self, key: str) -> bool:
        return key in self._records

    async def lookup(self, key: str) -> Result | None:
        found = self._records.get(key)
        if found is None:
            return None
        if found.record.kind == "none":
            return SCRATCH
        if found.record.kind == "layers" and found.record.chain:
            return Result(REMOTE, key)
        return None  # a local source: re-read every build, its files are in its users' keys

    async def materialize(self, result: Result) -> Result:
        found = self._records[result.ref]
        p = self._parts
        layers = [await self._local_layer(found, layer) for layer in self.chain(result.ref)]
        image = PulledImage(
            reference=found.blobs.name,
            manifest=Descriptor("", sha256_bytes(b""), 0),
            config={},
            config_digest=sha256_bytes(b""),
            layers=tuple(layers),
        )
        top = await unpack(image, p.snapshots, p.applier, p.catalog)
        # exported later as they came: the same digests as the cache's
        for layer, chain_id in zip(layers, chain_ids(image.diff_ids), strict=True):
            p.layers.put_layer(layer_snapshot_name(chain_id), SOURCE, layer)
        return Result("snapshot", top) if top else SCRATCH

    # -- for outputs and re-export -----------------------------------------------

    def chain(self, key: str) -> tuple[Layer, ...]:
        found = self._records[key]
        return found.config.chain_of(found.record)

    async def fetch(self, key: str, layer: Layer) -> None:
        """Blob of ``layer`` (of ``key``'s chain) into the content store."""
        await self._records[key].blobs.fetch(layer.descriptor, self._parts.content)

    async def _local_layer(self, found: _Found, layer: Layer) -> Layer:
        if is_empty(layer):
            # An empty layer's blob may not be in the cache (an image drops it:
            # inline caches); its tar is known, so it is made, not fetched.
            return await asyncio.to_thread(empty_layer_blob, self._parts.content, layer)
        await found.blobs.fetch(layer.descriptor, self._parts.content)
        return layer


def empty_layer_blob(content: ContentStore, layer: Layer) -> Layer:
    """An uncompressed blob of the empty layer ``layer`` in ``content`` (made
    here: an empty tar is all zeros, of one of two lengths)."""
    for n in (1024, 10240):
        data = b"\0" * n
        digest = sha256_bytes(data)
        if digest == layer.diff_id:
            if not content.has(digest):
                content.put(data, digest)
            return Layer(Descriptor(_UNCOMPRESSED, digest, n), digest)
    raise AssertionError(f"not an empty layer: {layer.diff_id}")  # is_empty said it was


class ImportedLayers:
    """``ChainLayers`` that also knows lazy imported results: their layers are
    the cache's blobs, fetched into the content store (not unpacked) when an
    output writes them; empty ones are never fetched (images drop them)."""

    def __init__(self, inner: ChainLayers, imported: CacheImport, *, fetch: bool = True) -> None:
        """``fetch=False``: blobs stay in the cache until someone needs their
        bytes (a build whose only outputs are pushes copies them registry to
        registry, ``CacheImport.fetch_blob``)."""
        self._inner = inner
        self._imported = imported
        self._fetch = fetch

    @staticmethod
    def top_name(result: Result) -> str | None:
        """What ``chain`` takes for a solve's result (None: scratch)."""
        return chain_name(result)

    async def chain(self, name: str | None) -> list[str]:
        if name is not None and name.startswith(REMOTE_CHAIN):
            n = len(self._imported.chain(name.removeprefix(REMOTE_CHAIN)))
            return [f"{name}#{i}" for i in range(n)]
        return await self._inner.chain(name)

    async def layer_of(self, chain: Sequence[str], index: int, opts: CompressionOpts) -> Layer:
        name = chain[index]
        if not name.startswith(REMOTE_CHAIN):
            return await self._inner.layer_of(chain, index, opts)
        key, _, i = name.removeprefix(REMOTE_CHAIN).rpartition("#")
        layer = self._imported.chain(key)[int(i)]
        if self._fetch and not is_empty(layer):
            await self._imported.fetch(key, layer)
        return layer


# --- loading ------------------------------------------------------------------------


async def load_imports(
    specs: Sequence[CacheSpec],
    parts: ImportParts,
    registry: RegistryClient,
    platform: Platform,
    events: EventSink,
) -> CacheImport:
    """Read each ``--cache-from`` (in order). One that cannot be read is a
    warning, as buildx: the build goes on without it."""
    imported = CacheImport(parts)
    for spec in specs:
        where = spec.get("ref") or spec.get("src")
        with ProgressStep(events, f"importing cache manifest from {where}"):
            try:
                if spec.type == "registry":
                    config, blobs = await _load_registry(spec, registry, parts.content, platform)
                else:
                    config, blobs = await asyncio.to_thread(_load_layout, spec)
            except (OciworkerError, OSError) as exc:
                events(Warning(f"failed to import cache {spec}: {exc}"))
                continue
        imported.add(config, blobs)
    return imported


async def _load_registry(
    spec: CacheSpec, registry: RegistryClient, content: ContentStore, platform: Platform
) -> tuple[CacheConfig, BlobSource]:
    ref = parse_reference(spec.get("ref"))
    where = f"cache {ref}"
    blobs = RegistryBlobs(registry, ref, str(ref))
    _, data = await registry.fetch_manifest(ref)
    manifest = _json_object(data, where)
    cfg_desc = manifest.get("config")
    if isinstance(cfg_desc, dict) and cfg_desc.get("mediaType") == CACHE_CONFIG_MEDIA_TYPE:
        cfg = config_from_manifest(manifest, where)
        await registry.fetch_blob(ref, cfg, content)
        data = await asyncio.to_thread(content.read, cfg.digest)
        return CacheConfig.from_bytes(data, where), blobs
    # An image: its inline cache, if it has one (an index: this platform's image).
    resolved = await registry.resolve(ref, platform, store=content)
    return _inline(resolved.config_json, where), blobs


def _inline(config_json: bytes, where: str) -> CacheConfig:
    config = _json_object(config_json, where)
    inline = config.get(INLINE_CACHE_KEY)
    if inline is None:
        raise NotFoundError(f"image {where.removeprefix('cache ')} has no inline cache")
    return CacheConfig.from_json(inline, where)


def _load_layout(spec: CacheSpec) -> tuple[CacheConfig, BlobSource]:
    root = Path(spec.get("src"))
    where = f"cache {root}"
    try:
        index = json.loads((root / "index.json").read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{where}: no index.json (not an OCI layout)") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: index.json is not JSON: {exc}") from None
    want_digest = spec.get("digest")
    chosen: dict[str, Any] | None = None
    for m in index.get("manifests") or []:
        if not isinstance(m, dict):
            continue
        name = (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        if (want_digest and m.get("digest") == want_digest) or (
            not want_digest and name == spec.tag
        ):
            chosen = m
    if chosen is None:
        what = f"digest {want_digest}" if want_digest else f"tag {spec.tag}"
        raise NotFoundError(f"{where}: no cache manifest with {what}")
    blobs = LayoutBlobs(root, str(root))
    manifest = _json_object(_read_blob(root, Descriptor.from_json(chosen)), where)
    cfg = config_from_manifest(manifest, where)
    if cfg.media_type != CACHE_CONFIG_MEDIA_TYPE:
        return _inline(_read_blob(root, cfg), where), blobs
    return CacheConfig.from_bytes(_read_blob(root, cfg), where), blobs


def _read_blob(root: Path, desc: Descriptor) -> bytes:
    data = (root / "blobs" / "sha256" / hex_part(check_digest(desc.digest))).read_bytes()
    if sha256_bytes(data) != desc.digest:
        raise RegistryError(f"cache {root}: blob {desc.digest} does not match its digest")
    return data


def _json_object(data: bytes, where: str) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{where}: not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise RegistryError(f"{where}: not a JSON object")
    return parsed
