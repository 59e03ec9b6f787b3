"""Layer diff: snapshot -> OCI layer blob (compare) and blob -> snapshot (apply).

The implementations load on first use (PEP 562): importing the Protocols from
``ociworker.diff.base`` must not pull in tar, gzip and zstd, which a fully
cached build never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ociworker.diff.base import Applier, Comparer, Compression, CompressionOpts

if TYPE_CHECKING:
    from ociworker.diff.apply import LayerApplier, apply_tar_stream
    from ociworker.diff.compare import LayerComparer, write_dir_layer

_LAZY = {
    "LayerApplier": "ociworker.diff.apply",
    "apply_tar_stream": "ociworker.diff.apply",
    "LayerComparer": "ociworker.diff.compare",
    "write_dir_layer": "ociworker.diff.compare",
}

__all__ = [
    "Applier",
    "Comparer",
    "Compression",
    "CompressionOpts",
    "LayerApplier",
    "LayerComparer",
    "apply_tar_stream",
    "write_dir_layer",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ociworker.diff' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
