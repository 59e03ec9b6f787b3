"""The exporters by output type name: the one place that maps ``type=`` to code."""

from __future__ import annotations

from collections.abc import Sequence

from ociworker.core.outputs import OUTPUT_TYPES, OutputSpec
from ociworker.errors import ConfigError
from ociworker.exporter.base import Exporter, ExporterInstance
from ociworker.exporter.containerimage import ImageExporter
from ociworker.exporter.imagearchive import DockerExporter, OCIExporter
from ociworker.exporter.layers import LayersExporter
from ociworker.exporter.local import LocalExporter
from ociworker.exporter.tar import TarExporter

EXPORTERS: dict[str, Exporter] = {
    "image": ImageExporter(),
    "oci": OCIExporter(),
    "docker": DockerExporter(),
    "local": LocalExporter(),
    "tar": TarExporter(),
    "layers": LayersExporter(),
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
