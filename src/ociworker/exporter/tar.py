"""``type=tar``: the result's files as one tar stream (``exporter.fs.export_tar``),
written through the target; the writer loads only when such an output is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ociworker.exporter.base import ExportParts, ExportResult, OutputExport, export_files


@dataclass(frozen=True)
class TarExport(OutputExport):
    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        from ociworker.exporter.fs import export_tar

        def write(root: Path) -> None:
            with parts.target.stream(self.output) as f:
                export_tar(root, f)

        await export_files(parts, result.top, "exporting to client tarball", write)
