"""Assemble an image (config + manifest) from layers already in the content store.

The comparer has already written the layer blobs; this module only writes the
two small JSON blobs that name them, so it never reads a layer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ociworker.content.image import read_image
from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest, canonical_json, check_digest, sha256_bytes
from ociworker.core.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Layer,
    layer_compression,
)
from ociworker.errors import DigestMismatchError, UnsupportedError, UserError

_NO_ANNOTATIONS: Mapping[str, str] = MappingProxyType({})

_OCI_LAYER_TYPES = {"": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
_DOCKER_LAYER_TYPES = {"": DOCKER_LAYER, "gzip": DOCKER_LAYER_GZIP}


@dataclass(frozen=True)
class ImageResult:
    """The descriptors of an image whose blobs are all in the content store."""

    manifest: Descriptor
    config: Descriptor
    layers: tuple[Layer, ...]


def _put_once(store: ContentStore, data: bytes) -> Digest:
    """Store ``data`` unless a blob of its digest is already there. A rebuild that
    changed nothing makes the same config and manifest: the stored blob was verified
    and fsynced by the commit that wrote it, so writing and fsyncing it again (two
    fsyncs per blob) would only cost time."""
    digest = sha256_bytes(data)
    if store.has(digest):
        return digest
    return store.put(data, expected=digest)


def write_image(
    store: ContentStore,
    config: dict[str, Any],
    layers: Sequence[Layer],
    *,
    oci_media_types: bool = True,
    annotations: Mapping[str, str] = _NO_ANNOTATIONS,
    remote_ok: bool = False,
) -> ImageResult:
    """Write the config and manifest blobs for ``layers`` and return their descriptors.

    ``config`` is the image config without ``rootfs`` (any given one is replaced);
    the caller's dict is not modified. Layer media types are rewritten to the
    family chosen by ``oci_media_types`` so one manifest never mixes the two.
    ``remote_ok``: a layer blob may be absent (it stays in an imported cache's
    registry, and the image is only pushed: it is mounted from there).
    """
    if not isinstance(config, dict):
        raise UserError(f"image config must be a JSON object, got {type(config).__name__}")
    layers = tuple(layers)
    _check_history(config, len(layers))
    if annotations and not oci_media_types:
        # Docker schema 2 manifests have no annotations field; dropping them
        # silently would lose data the caller asked for.
        raise UnsupportedError("manifest annotations need OCI media types (oci-mediatypes=true)")

    for layer in layers:
        if not (remote_ok and not store.has(layer.descriptor.digest)):
            _check_blob(store, layer.descriptor)
    layers = tuple(_retype_layer(layer, oci_media_types) for layer in layers)
    cfg = copy.deepcopy(config)
    cfg["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    cfg_bytes = canonical_json(cfg)
    cfg_desc = Descriptor(
        media_type=OCI_CONFIG if oci_media_types else DOCKER_CONFIG,
        digest=_put_once(store, cfg_bytes),
        size=len(cfg_bytes),
    )

    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci_media_types else DOCKER_MANIFEST,
        "config": cfg_desc.to_json(),
        "layers": [layer.descriptor.to_json() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    man_bytes = canonical_json(manifest)
    man_desc = Descriptor(
        media_type=manifest["mediaType"],
        digest=_put_once(store, man_bytes),
        size=len(man_bytes),
    )
    return ImageResult(manifest=man_desc, config=cfg_desc, layers=layers)


def load_image(store: ContentStore, manifest: Descriptor) -> ImageResult:
    """Rebuild an ``ImageResult`` from a stored manifest (e.g. an image store entry)."""
    man, config = read_image(store, manifest.digest)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    layer_descs = [Descriptor.from_json(d) for d in man["layers"]]
    if len(diff_ids) != len(layer_descs):
        raise UserError(
            f"image {manifest.digest}: config has {len(diff_ids)} diff_ids "
            f"but the manifest has {len(layer_descs)} layers"
        )
    layers = tuple(
        Layer(descriptor=d, diff_id=check_digest(str(i)))
        for d, i in zip(layer_descs, diff_ids, strict=True)
    )
    return ImageResult(manifest=manifest, config=Descriptor.from_json(man["config"]), layers=layers)


def _check_history(config: Mapping[str, Any], n_layers: int) -> None:
    history = config.get("history")
    if not history:
        return
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise UserError("image config history must be a list of objects")
    non_empty = sum(1 for h in history if not h.get("empty_layer", False))
    if non_empty != n_layers:
        raise UserError(
            f"image config history has {non_empty} entries that create a layer "
            f"(without empty_layer: true) but the image has {n_layers} layers; "
            "every layer needs exactly one such history entry"
        )


def _check_blob(store: ContentStore, desc: Descriptor) -> None:
    # A manifest naming a missing or truncated blob would only fail much later,
    # at push or load time, far from the step that produced it.
    size = store.size(desc.digest)
    if size != desc.size:
        raise DigestMismatchError(
            f"layer {desc.digest}: descriptor says {desc.size} bytes, store has {size}"
        )


def _retype_layer(layer: Layer, oci: bool) -> Layer:
    desc = layer.descriptor
    try:
        compression = layer_compression(desc.media_type)
    except ValueError:
        raise UnsupportedError(
            f"layer {desc.digest} has unsupported media type {desc.media_type!r}"
        ) from None
    table = _OCI_LAYER_TYPES if oci else _DOCKER_LAYER_TYPES
    if compression not in table:
        raise UnsupportedError(f"{compression} layers need OCI media types (layer {desc.digest})")
    media_type = table[compression]
    if media_type == desc.media_type:
        return layer
    return Layer(
        descriptor=Descriptor(
            media_type=media_type,
            digest=desc.digest,
            size=desc.size,
            annotations=desc.annotations,
            platform=desc.platform,
        ),
        diff_id=layer.diff_id,
    )
