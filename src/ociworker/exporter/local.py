"""``type=local``: the result's files, copied into a directory by the target."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ociworker.exporter.base import ExportParts, ExportResult, OutputExport, export_files


@dataclass(frozen=True)
class LocalExport(OutputExport):
    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        write = functools.partial(parts.target.local, self.output)
        await export_files(parts, result.top, "exporting to client directory", write)
