"""The exporters by output type name: the one place that maps ``type=`` to code."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import cast

from ociworker.core.outputs import OUTPUT_TYPES, OutputSpec
from ociworker.errors import ConfigError
from ociworker.exporter.base import Exporter, ExporterInstance

#: type name -> "module:class"; each exporter is a class whose ``resolve`` (a
#: classmethod) makes its instances
_REGISTERED = {
    "image": "containerimage:ImageExport",
    "registry": "containerimage:RegistryExport",
    "oci": "imagearchive:OCIArchiveExport",
    "docker": "imagearchive:DockerArchiveExport",
    "local": "local:LocalExport",
    "tar": "tar:TarExport",
    "layers": "layers:LayersExport",
}


class _Registry(Mapping[str, Exporter]):
    """The exporters by name, each module imported when its type is first asked
    for: a build without outputs (a warm rebuild) loads none of them, and
    start-up is most of such a build's time."""

    def __getitem__(self, name: str) -> Exporter:
        module, _, cls = _REGISTERED[name].partition(":")
        return cast(Exporter, getattr(importlib.import_module(f"{__package__}.{module}"), cls))

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTERED)

    def __len__(self) -> int:
        return len(_REGISTERED)


EXPORTERS: Mapping[str, Exporter] = _Registry()


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
