"""Exporters: image assembly, the image store and the build outputs.

``image`` writes config + manifest for committed layers; ``imagestore`` names
images; ``archive`` streams OCI / docker archives; ``fs`` writes the final tree
to a directory or a tar stream.
"""

from ociworker.exporter.archive import export_docker_archive, export_oci_archive
from ociworker.exporter.fs import export_local, export_tar
from ociworker.exporter.image import ImageResult, load_image, read_image, write_image
from ociworker.exporter.imagestore import ImageStore, StoredImage

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
