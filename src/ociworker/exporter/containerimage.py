"""``type=image``: the image kept in the worker's image store under its names,
and pushed to their registry with ``push=true``; ``type=registry``: pushed only
(BuildKit's ``image,push=true`` without the local name)."""

from __future__ import annotations

from dataclasses import dataclass

from ociworker.exporter.base import ExportParts, ExportResult, OutputExport, image_names, push


@dataclass(frozen=True)
class ImageExport(OutputExport):
    needs_image = True

    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        assert result.image is not None
        names = image_names(self.output, result.tags)
        for name in names:
            parts.images.put(name, result.image.manifest)
        if self.output.pushes:
            await push(result, parts, names)


@dataclass(frozen=True)
class RegistryExport(OutputExport):
    needs_image = True

    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        await push(result, parts, image_names(self.output, result.tags))
