"""Layer diff: snapshot -> OCI layer blob (compare) and blob -> snapshot (apply)."""

from ociworker.diff.apply import LayerApplier, apply_tar_stream
from ociworker.diff.base import Applier, Comparer, Compression, CompressionOpts
from ociworker.diff.compare import LayerComparer, write_dir_layer

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
