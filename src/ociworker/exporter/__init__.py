"""Exporters: a build's result -> layers, images and the build outputs.

``base`` has the ``Exporter`` Protocol and what an export sees; ``exporters``
maps each output type to its exporter (``containerimage``, ``imagearchive``,
``local``, ``tar``, ``layers``). ``chain`` turns snapshots into layer blobs,
``assemble`` layers into an image (written by ``image``); ``imagestore`` names
images; ``target`` is where outputs are written. The writers of files,
``ocilayout`` (OCI / docker image tars) and ``fs`` (a directory, a tar of the
files), load only when a build writes such an output: the names below that
come from them are imported on first use.
"""

from typing import TYPE_CHECKING, Any

from ociworker.content.image import read_image
from ociworker.exporter.image import ImageResult, load_image, write_image
from ociworker.exporter.imagestore import ImageStore, StoredImage

if TYPE_CHECKING:
    from ociworker.exporter.fs import export_local, export_tar
    from ociworker.exporter.ocilayout import export_docker_archive, export_oci_archive

_LAZY = {
    "export_docker_archive": "ociworker.exporter.ocilayout",
    "export_oci_archive": "ociworker.exporter.ocilayout",
    "export_local": "ociworker.exporter.fs",
    "export_tar": "ociworker.exporter.fs",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ImageResult",
    "ImageStore",
    "StoredImage",
    "export_docker_archive",
    "export_local",
    "export_oci_archive",
    "export_tar",
    "load_image",
    "read_image",
    "write_image",
]
