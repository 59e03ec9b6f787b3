"""``type=oci`` and ``type=docker``: the image as one tar (an OCI image layout;
the docker one is also what ``docker load`` reads), written through the target.
The tar writers (``exporter.ocilayout``) load only when such an output is written."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import ClassVar

from ociworker.core.progress import Info, ProgressStep
from ociworker.exporter.base import ExportParts, ExportResult, OutputExport, image_names


@dataclass(frozen=True)
class OCIArchiveExport(OutputExport):
    needs_image = True
    docker: ClassVar[bool] = False

    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        from ociworker.exporter.ocilayout import export_docker_archive, export_oci_archive

        image = result.image
        assert image is not None
        names = image_names(self.output, result.tags)
        fn = export_docker_archive if self.docker else export_oci_archive
        label = "docker image format" if self.docker else "oci image format"
        with ProgressStep(parts.events, f"exporting to {label}") as step:
            parts.events(Info(f"writing image {image.manifest.digest}", step.digest))

            def write() -> None:
                with parts.target.stream(self.output) as f:
                    fn(parts.content, image, names, f)

            await asyncio.to_thread(write)


@dataclass(frozen=True)
class DockerArchiveExport(OCIArchiveExport):
    docker = True
    oci_media_types = False  # docker media types unless the output asks for OCI ones
