"""``type=local``: the result's files, copied into a directory by the target."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import ProgressStep
from ociworker.exporter.base import ExportParts, ExportResult, OutputInstance, output_options


class LocalExporter:
    def resolve(self, output: OutputSpec) -> LocalInstance:
        return LocalInstance(output, output_options(output))


@dataclass(frozen=True)
class LocalInstance(OutputInstance):
    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        with ProgressStep(parts.events, "exporting to client directory"):
            async with parts.view(result.top) as root:
                await asyncio.to_thread(parts.target.local, self.output, root)
