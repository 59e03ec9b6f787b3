"""``type=image``: the image kept in the worker's image store under its names."""

from __future__ import annotations

from dataclasses import dataclass

from ociworker.core.outputs import OutputSpec
from ociworker.exporter.base import (
    ExportParts,
    ExportResult,
    OutputInstance,
    image_names,
    output_options,
)


class ImageExporter:
    def resolve(self, output: OutputSpec) -> ImageInstance:
        return ImageInstance(output, output_options(output))


@dataclass(frozen=True)
class ImageInstance(OutputInstance):
    @property
    def needs_image(self) -> bool:
        return True

    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        assert result.image is not None
        for name in image_names(self.output, result.tags):
            parts.images.put(name, result.image.manifest)
