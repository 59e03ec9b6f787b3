"""OCI image-spec values: media types, descriptors, platforms (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ociworker.core.digest import Digest, check_digest

# OCI media types
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Docker schema 2 media types
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
#: a layer descriptor's diffID, under the key containerd and BuildKit use
ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"
#: which step made a layer streamed by ``--output type=layers``: its 1-based index
#: among the steps built on the base image, and the vertex digest and name
ANNOTATION_STEP_INDEX = "dev.ociworker.step.index"
ANNOTATION_VERTEX_DIGEST = "dev.ociworker.vertex.digest"
ANNOTATION_VERTEX_NAME = "dev.ociworker.vertex.name"


def layer_compression(media_type: str) -> str:
    """'gzip', 'zstd' or '' (uncompressed) for a layer media type."""
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type in (OCI_LAYER, DOCKER_LAYER):
        return ""
    raise ValueError(f"unsupported layer media type {media_type!r}")


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) == 1:
            return cls(os="linux", architecture=_norm_arch(parts[0]))
        if len(parts) == 2:
            return cls(os=parts[0], architecture=_norm_arch(parts[1]))
        if len(parts) == 3:
            return cls(os=parts[0], architecture=_norm_arch(parts[1]), variant=parts[2])
        raise ValueError(f"invalid platform {text!r}")

    def to_json(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Platform:
        return cls(
            os=str(d.get("os", "")),
            architecture=str(d.get("architecture", "")),
            variant=str(d.get("variant", "")),
        )


def _norm_arch(arch: str) -> str:
    return {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}.get(arch, arch)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: Platform | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Descriptor:
        plat = d.get("platform")
        return cls(
            media_type=str(d.get("mediaType", "")),
            digest=check_digest(str(d.get("digest", ""))),
            size=int(d.get("size", 0)),
            annotations=tuple(sorted((d.get("annotations") or {}).items())),
            platform=Platform.from_json(plat) if isinstance(plat, dict) else None,
        )


@dataclass(frozen=True)
class Layer:
    """A layer blob in the content store and the digest of its uncompressed tar."""

    descriptor: Descriptor
    diff_id: Digest
    #: when the snapshot the layer was made from was first turned into a layer
    #: (seconds since the epoch; None: not known, e.g. a layer of an imported
    #: cache). Not part of the layer's identity.
    created: float | None = field(default=None, compare=False)
