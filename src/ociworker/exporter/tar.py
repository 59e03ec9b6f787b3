"""``type=tar``: the result's files as one tar stream (``exporter.fs.export_tar``),
written through the target; the writer loads only when such an output is written."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import ProgressStep
from ociworker.exporter.base import ExportParts, ExportResult, OutputInstance, output_options


class TarExporter:
    def resolve(self, output: OutputSpec) -> TarInstance:
        return TarInstance(output, output_options(output))


@dataclass(frozen=True)
class TarInstance(OutputInstance):
    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        from ociworker.exporter.fs import export_tar

        def write(root: Path) -> None:
            with parts.target.stream(self.output) as f:
                export_tar(root, f)

        with ProgressStep(parts.events, "exporting to client tarball"):
            async with parts.view(result.top) as root:
                await asyncio.to_thread(write, root)
