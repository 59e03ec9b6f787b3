"""Layer diff Protocols: Comparer (snapshot -> layer blob) and Applier (blob -> snapshot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ociworker.core.digest import Digest
from ociworker.core.mounts import Mount
from ociworker.core.oci import Descriptor, Layer

Compression = Literal["gzip", "zstd", "uncompressed"]


@dataclass(frozen=True)
class CompressionOpts:
    compression: Compression = "gzip"
    level: int | None = None  # None: the codec's default
    oci_media_types: bool = True
    #: SOURCE_DATE_EPOCH: file times in the layer are clamped to it (None: kept)
    epoch: int | None = None


class Comparer(Protocol):
    async def compare(
        self, lower: Sequence[Mount], upper: Sequence[Mount], opts: CompressionOpts
    ) -> Layer:
        """Write the changes from ``lower`` to ``upper`` as a layer blob into the
        content store; diffID and digest are computed in the same streaming pass."""
        ...


class Applier(Protocol):
    async def apply(self, layer: Descriptor, mounts: Sequence[Mount]) -> Digest:
        """Extract the layer blob onto the snapshot ``mounts``; returns its diffID."""
        ...
