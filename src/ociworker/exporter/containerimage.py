"""``type=image``: the image kept in the worker's image store under its names."""

from __future__ import annotations

from dataclasses import dataclass

from ociworker.exporter.base import ExportParts, ExportResult, OutputExport, image_names


@dataclass(frozen=True)
class ImageExport(OutputExport):
    needs_image = True

    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        assert result.image is not None
        for name in image_names(self.output, result.tags):
            parts.images.put(name, result.image.manifest)
