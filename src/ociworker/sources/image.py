"""Image source: pull an image into the content store, unpack it into snapshots.

Pulled blobs are keyed by digest, so a second pull of the same image fetches
manifests only. Unpacked layers are named by ChainID (``layer-<hex>``): the
same stack of layers is one chain of snapshots whatever image it came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ociworker.content.image import read_image
from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest, check_digest, hex_part
from ociworker.core.oci import DOCKER_FOREIGN_LAYER, Descriptor, Layer, Platform, layer_compression
from ociworker.core.reference import Reference, parse_reference
from ociworker.diff.base import Applier
from ociworker.errors import DigestMismatchError, RegistryError, UnsupportedError, UserError
from ociworker.registry.client import RegistryClient
from ociworker.registry.neterrors import invalid_reason
from ociworker.snapshot.base import SnapshotCatalog, Snapshotter

#: Docker's default max-concurrent-downloads
DEFAULT_CONCURRENCY = 3
LAYER_SNAPSHOT_PREFIX = "layer-"


@dataclass(frozen=True)
class PulledImage:
    reference: str  # canonical, e.g. docker.io/library/busybox:latest
    manifest: Descriptor
    config: dict[str, Any] = field(hash=False)
    config_digest: Digest
    layers: tuple[Layer, ...]
    index_digest: Digest | None = None

    @property
    def diff_ids(self) -> list[Digest]:
        return [layer.diff_id for layer in self.layers]


def chain_ids(diff_ids: Sequence[Digest]) -> list[Digest]:
    """OCI ChainIDs: chain(0) = diffid(0), chain(n) = sha256(chain(n-1) + " " + diffid(n))."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            text = f"{out[-1]} {diff_id}".encode()
            out.append(Digest("sha256:" + hashlib.sha256(text).hexdigest()))
    return out


def layer_snapshot_name(chain_id: Digest) -> str:
    return LAYER_SNAPSHOT_PREFIX + hex_part(chain_id)


def _parse_config(reference: str, config_json: bytes) -> tuple[dict[str, Any], list[Digest]]:
    try:
        config = json.loads(config_json)
        rootfs = config["rootfs"]
        if rootfs.get("type") != "layers":
            raise ValueError(f"rootfs type {rootfs.get('type')!r}, want 'layers'")
        diff_ids = [check_digest(str(d)) for d in rootfs.get("diff_ids") or []]
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
        raise RegistryError(
            f"image {reference} has an invalid config: {invalid_reason(exc)}"
        ) from None
    if not isinstance(config, dict):
        raise RegistryError(f"image {reference} has an invalid config: not a JSON object")
    return config, diff_ids


def _check_layer_type(reference: str, desc: Descriptor) -> None:
    if desc.media_type == DOCKER_FOREIGN_LAYER:
        raise UnsupportedError(
            f"image {reference} has a foreign (Windows) layer {desc.digest}; not supported"
        )
    try:
        layer_compression(desc.media_type)
    except ValueError:
        raise UnsupportedError(
            f"image {reference}: unsupported layer media type {desc.media_type!r}"
        ) from None


def image_from_content(
    content: ContentStore, reference: str, manifest_digest: Digest
) -> PulledImage | None:
    """An image whose manifest, config and layers are all in ``content`` (None
    when any of them is missing: it must be pulled)."""
    if not content.has(manifest_digest):
        return None
    manifest, config = read_image(content, manifest_digest)
    layers_json = manifest.get("layers") or []
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(layers_json) != len(diff_ids):
        return None
    layers = []
    for lj, did in zip(layers_json, diff_ids, strict=True):
        desc = Descriptor.from_json(lj)
        if not content.has(desc.digest):
            return None
        layers.append(Layer(desc, check_digest(did)))
    cfg_desc = Descriptor.from_json(manifest["config"])
    return PulledImage(
        reference=reference,
        manifest=Descriptor(
            str(manifest.get("mediaType", "")),
            manifest_digest,
            content.size(manifest_digest),
        ),
        config=config,
        config_digest=cfg_desc.digest,
        layers=tuple(layers),
    )


class ImagePuller:
    def __init__(
        self,
        client: RegistryClient,
        store: ContentStore,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self._client = client
        self._store = store
        self._concurrency = concurrency

    async def pull(
        self, ref: str, platform: Platform, *, client: RegistryClient | None = None
    ) -> PulledImage:
        """Resolve ``ref`` for ``platform`` and fetch manifest, config and layers.

        ``client`` is a per-job view (``RegistryClient.with_credentials``) when
        the job has its own registry credentials."""
        client = client or self._client
        parsed = parse_reference(ref)
        name = str(parsed)
        resolved = await client.resolve(parsed, platform, store=self._store)
        if not self._store.has(resolved.manifest.digest):
            await asyncio.to_thread(
                self._store.put, resolved.manifest_json, resolved.manifest.digest
            )
        config, diff_ids = _parse_config(name, resolved.config_json)
        descs = resolved.layer_descriptors
        if len(descs) != len(diff_ids):
            raise RegistryError(
                f"image {name} is invalid: manifest has {len(descs)} layers, "
                f"config has {len(diff_ids)} diff_ids"
            )
        for desc in descs:
            _check_layer_type(name, desc)
        await self._fetch_all(client, parsed, descs)
        return PulledImage(
            reference=name,
            manifest=resolved.manifest,
            config=config,
            config_digest=resolved.config_descriptor.digest,
            layers=tuple(Layer(d, i) for d, i in zip(descs, diff_ids, strict=True)),
            index_digest=resolved.index_digest,
        )

    async def _fetch_all(
        self, client: RegistryClient, ref: Reference, descs: Sequence[Descriptor]
    ) -> None:
        sem = asyncio.Semaphore(self._concurrency)

        async def one(desc: Descriptor) -> None:
            async with sem:
                await client.fetch_blob(ref, desc, self._store)

        missing = {d.digest: d for d in descs if not self._store.has(d.digest)}
        try:
            # A TaskGroup cancels the other downloads as soon as one fails.
            async with asyncio.TaskGroup() as tg:
                for desc in missing.values():
                    tg.create_task(one(desc))
        except ExceptionGroup as group:
            # Callers handle our error classes, not groups: the first failure is the story.
            raise group.exceptions[0] from None


async def unpack(
    image: PulledImage,
    snapshotter: Snapshotter,
    applier: Applier,
    catalog: SnapshotCatalog,
) -> str | None:
    """Apply ``image``'s layers as a chain of committed snapshots named by ChainID;
    the name of the top one, or None for an image without layers.

    Layers already unpacked (by an earlier image or a concurrent unpack) are
    skipped; two unpacks racing for the same layer both succeed.
    """
    parent: str | None = None
    for layer, chain_id in zip(image.layers, chain_ids(image.diff_ids), strict=True):
        name = layer_snapshot_name(chain_id)
        info = await catalog.stat(name)
        if info is None or info.kind != "committed":
            await _unpack_layer(layer, name, parent, snapshotter, applier, catalog)
        parent = name
    return parent


async def _unpack_layer(
    layer: Layer,
    name: str,
    parent: str | None,
    snapshotter: Snapshotter,
    applier: Applier,
    catalog: SnapshotCatalog,
) -> None:
    key = f"unpack-{uuid.uuid4().hex}-{name}"
    try:
        mounts = await snapshotter.prepare(key, parent)
        diff_id = await applier.apply(layer.descriptor, mounts)
        if diff_id != layer.diff_id:
            raise DigestMismatchError(
                f"layer {layer.descriptor.digest}: uncompressed digest is {diff_id}, "
                f"image config says {layer.diff_id}"
            )
        try:
            await snapshotter.commit(name, key)
        except FileExistsError:
            # Someone else committed this chain first; theirs is as good as ours.
            info = await catalog.stat(name)
            if info is None or info.kind != "committed":
                raise
            await _discard(snapshotter, key)
    except BaseException:
        await _discard(snapshotter, key)
        raise


async def _discard(snapshotter: Snapshotter, key: str) -> None:
    # Best effort: a leftover active key is garbage for prune, not a build failure,
    # and must not hide the error that brought us here.
    with contextlib.suppress(Exception):
        await snapshotter.remove(key)
