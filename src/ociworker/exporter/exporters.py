"""The exporters by output type name: the one place that maps ``type=`` to code."""

from __future__ import annotations

from collections.abc import Sequence

from ociworker.core.outputs import OUTPUT_TYPES, OutputSpec
from ociworker.errors import ConfigError
from ociworker.exporter.base import Exporter, ExporterInstance
from ociworker.exporter.containerimage import ImageExport
from ociworker.exporter.imagearchive import DockerArchiveExport, OCIArchiveExport
from ociworker.exporter.layers import LayersExport
from ociworker.exporter.local import LocalExport
from ociworker.exporter.tar import TarExport

#: each exporter is a class: ``resolve`` (a classmethod) makes its instances
EXPORTERS: dict[str, Exporter] = {
    "image": ImageExport,
    "oci": OCIArchiveExport,
    "docker": DockerArchiveExport,
    "local": LocalExport,
    "tar": TarExport,
    "layers": LayersExport,
}


def resolve_outputs(outputs: Sequence[OutputSpec]) -> list[ExporterInstance]:
    """Each output's exporter instance, in order; the first bad option raises."""
    instances: list[ExporterInstance] = []
    for out in outputs:
        exporter = EXPORTERS.get(out.type)
        if exporter is None:
            raise ConfigError(
                f"unknown output type {out.type!r}: use one of {', '.join(OUTPUT_TYPES)}"
            )
        instances.append(exporter.resolve(out))
    return instances
