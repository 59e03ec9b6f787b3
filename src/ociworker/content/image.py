"""Reading an image (manifest + config) back from the content store: what the
image store, a FROM of a stored image and prune all need, below both the
sources and the exporters."""

from __future__ import annotations

import json
from typing import Any

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest, check_digest
from ociworker.core.oci import MANIFEST_TYPES
from ociworker.errors import NotFoundError, UnsupportedError, UserError


def read_image(store: ContentStore, manifest_digest: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed manifest and config of an image manifest in the store."""
    manifest = _read_json(store, manifest_digest, "manifest")
    media_type = manifest.get("mediaType", "")
    # mediaType is optional in OCI manifests; a config + layers pair identifies one
    if media_type and media_type not in MANIFEST_TYPES:
        raise UnsupportedError(
            f"{manifest_digest} is a {media_type}, not an image manifest "
            "(pick one platform of an index first)"
        )
    cfg = manifest.get("config")
    if not isinstance(cfg, dict) or not isinstance(manifest.get("layers"), list):
        raise UserError(f"manifest {manifest_digest} has no config or layers")
    config = _read_json(store, check_digest(str(cfg.get("digest", ""))), "config")
    return manifest, config


def _read_json(store: ContentStore, digest: Digest | str, what: str) -> dict[str, Any]:
    try:
        raw = store.read(digest)
    except NotFoundError:
        raise NotFoundError(f"image {what} {digest} not found in content store") from None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"image {what} {digest} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"image {what} {digest} is not a JSON object")
    return value
