"""Images from an OCI image layout directory (``--build-context
NAME=oci-layout://PATH[:TAG|@DIGEST]``): the manifest the tag or digest names
(for this platform, through an index), copied with its config and layers into
the content store, each blob checked against its digest. The build then uses
it as a pulled image: the source op finds every blob in the store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest, check_digest, hex_part
from ociworker.core.oci import Platform
from ociworker.errors import NotFoundError, UserError

_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class LayoutImage:
    manifest_digest: Digest
    config: dict[str, Any]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise NotFoundError(f"{what}: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{what}: {path} is not a JSON object")
    return doc


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / hex_part(check_digest(digest))


def _import(content: ContentStore, layout: Path, digest: str, what: str) -> None:
    if content.has(digest):
        return
    src = _blob(layout, digest)
    try:
        with open(src, "rb") as f, content.ingest(expected=check_digest(digest)) as ingest:
            while chunk := f.read(1 << 20):
                ingest.write(chunk)
            ingest.commit()
    except FileNotFoundError:
        raise NotFoundError(f"{what}: blob {digest} is missing from {layout}") from None


def load_layout_image(
    content: ContentStore, layout: Path, ref: str, platform: Platform, what: str
) -> LayoutImage:
    """The image ``ref`` (a tag, or ``sha256:...``) of the layout at ``layout``,
    its blobs imported into ``content``. ``what`` names it in errors."""
    index = _read_json(layout / "index.json", what)
    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if ref.startswith("sha256:"):
        found = [m for m in entries if m.get("digest") == ref]
        desc: dict[str, Any] = found[0] if found else {"digest": ref, "mediaType": ""}
    else:
        found = [m for m in entries if (m.get("annotations") or {}).get(_REF_NAME) == ref]
        if not found:
            tags = sorted(
                {str((m.get("annotations") or {}).get(_REF_NAME)) for m in entries} - {"None"}
            )
            raise NotFoundError(
                f"{what}: no image tagged {ref!r} in {layout} (tags: {', '.join(tags) or 'none'})"
            )
        desc = found[0]
    digest = str(desc["digest"])
    doc = _read_json(_blob(layout, digest), what)
    if desc.get("mediaType") in _INDEX_TYPES or doc.get("manifests") is not None:
        chosen = [
            m
            for m in doc.get("manifests") or []
            if (m.get("platform") or {}).get("os") == platform.os
            and (m.get("platform") or {}).get("architecture") == platform.architecture
        ]
        if not chosen:
            raise NotFoundError(f"{what}: no image for {platform} in {layout}")
        _import(content, layout, digest, what)
        digest = str(chosen[0]["digest"])
        doc = _read_json(_blob(layout, digest), what)
    config_digest = str((doc.get("config") or {}).get("digest", ""))
    if not config_digest:
        raise UserError(f"{what}: {digest} in {layout} is not an image manifest")
    for layer in doc.get("layers") or []:
        _import(content, layout, str(layer["digest"]), what)
    _import(content, layout, config_digest, what)
    _import(content, layout, digest, what)
    config = json.loads(content.read(config_digest))
    return LayoutImage(check_digest(digest), config)
