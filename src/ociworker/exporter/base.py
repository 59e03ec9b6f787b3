"""Exporters, in BuildKit's shape: ``Exporter.resolve(output)`` checks an output's
options before anything runs and gives an ``ExporterInstance``, whose ``export``
writes the output's artifact through the ``ExportTarget`` once the build is solved.

An instance may also work while the solve runs (``type=layers`` writes each
step's layer as soon as it is committed): its ``watch`` registers a
``SolveStream`` on the build's ``SolveWatch``, which hands every solved vertex to
the streams. Exporters load their writers (tar, the OCI layout) only in
``export``: a fully cached build that writes no file does not import them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, Self, TypeVar

from ociworker.content.store import ContentStore
from ociworker.core.graph import Vertex
from ociworker.core.oci import Descriptor
from ociworker.core.outputs import IMAGE_TYPES, OutputSpec
from ociworker.core.progress import EventSink, ProgressStep
from ociworker.core.reference import parse_reference
from ociworker.diff.base import CompressionOpts
from ociworker.errors import UnsupportedError
from ociworker.exporter.assemble import LayerOptions
from ociworker.exporter.chain import ChainLayers
from ociworker.exporter.image import ImageResult
from ociworker.exporter.target import ExportTarget
from ociworker.solver.scheduler import Result

if TYPE_CHECKING:  # the push machinery loads only when an output pushes
    from ociworker.exporter.push import BlobSources, FetchBlob, Pusher


class ImageNamer(Protocol):
    """Where ``type=image`` (and ``-t``) keep an image under a name."""

    def put(self, name: str, desc: Descriptor) -> None: ...


@dataclass(frozen=True)
class ExportResult:
    """What a build made, as the exporters see it."""

    image: ImageResult | None  # assembled when any output, tag or file needs it
    top: str | None  # the result's snapshot (None: an empty filesystem)
    tags: tuple[str, ...] = ()  # the build's ``-t`` names, as given


@dataclass(frozen=True)
class ExportParts:
    """The worker's parts an export uses, and where its outputs go."""

    content: ContentStore
    images: ImageNamer
    #: a read-only mounted view of a committed snapshot (an empty dir for None)
    view: Callable[[str | None], AbstractAsyncContextManager[Path]]
    layers: ChainLayers
    target: ExportTarget
    events: EventSink
    #: the registry with the job's credentials, and where pulled blobs came
    #: from (None: this caller cannot push)
    registry: Pusher | None = None
    sources: BlobSources | None = None
    #: brings a blob the content store lacks (an imported cache's layer, left
    #: where it is while only pushes need it); None: every blob is local
    fetch_blob: FetchBlob | None = None


class SolveStream(Protocol):
    """Export work done while the solve runs, fed with every solved vertex."""

    def on_result(self, vertex: Vertex, result: Result) -> None: ...

    async def wait(self) -> None:
        """Wait for the work started so far; the first failure cancels the rest."""
        ...

    async def cancel(self) -> None: ...


_S = TypeVar("_S", bound=SolveStream)


class SolveWatch:
    """One build's solve as the exporters see it while it runs: the target
    vertex, the layer options, the parts, and the streams the instances opened.
    A stream reports its first failure with ``failed``; the build's
    ``on_failure`` (cancelling the solve) runs once."""

    def __init__(self, target: Vertex | None, opts: CompressionOpts, parts: ExportParts) -> None:
        self.target = target
        self.opts = opts
        self.parts = parts
        self._streams: dict[object, SolveStream] = {}
        #: the first stream failure, and what to call when one happens
        self.error: BaseException | None = None
        self.on_failure: Callable[[], object] | None = None

    def stream(self, key: object, make: Callable[[], _S]) -> _S:
        """The stream opened under ``key``, made by ``make`` on first use (the
        instances of one exporter share one stream)."""
        got = self._streams.get(key)
        if got is None:
            got = self._streams[key] = make()
        return got  # type: ignore[return-value]

    @property
    def active(self) -> bool:
        return bool(self._streams)

    def on_result(self, vertex: Vertex, result: Result) -> None:
        for s in self._streams.values():
            s.on_result(vertex, result)

    def failed(self, error: BaseException) -> None:
        if self.error is not None:
            return
        self.error = error
        if self.on_failure is not None:
            self.on_failure()

    async def wait(self) -> None:
        for s in self._streams.values():
            await s.wait()

    async def cancel(self) -> None:
        await asyncio.gather(*(s.cancel() for s in self._streams.values()))


class ExporterInstance(Protocol):
    """One output, resolved: its options are valid."""

    @property
    def layer_options(self) -> LayerOptions:
        """The layer options this output names (``compression`` & co.)."""
        ...

    @property
    def needs_image(self) -> bool:
        """Whether ``export`` needs the assembled image."""
        ...

    @property
    def runs_last(self) -> bool:
        """Whether ``export`` waits for the other outputs (a push: whatever the
        registry says, the local outputs are written)."""
        ...

    def watch(self, solve: SolveWatch) -> None:
        """Called before the solve starts; may open a stream on ``solve``."""
        ...

    async def export(self, result: ExportResult, parts: ExportParts) -> None:
        """Write the output through ``parts.target``."""
        ...


class Exporter(Protocol):
    def resolve(self, output: OutputSpec) -> ExporterInstance:
        """Check ``output``'s options (ConfigError if one is wrong)."""
        ...


@dataclass(frozen=True)
class OutputExport:
    """The common part of the exporters: each subclass is the ``Exporter`` of one
    output type (``resolve`` is a classmethod) and its instances are that
    type's ``ExporterInstance``. By default an export needs no image and does
    nothing while the solve runs."""

    output: OutputSpec
    layer_options: LayerOptions

    #: the media types this output asks for when it does not say
    #: ``oci-mediatypes=true`` (None: it leaves them to the other outputs)
    oci_media_types: ClassVar[bool | None] = None
    needs_image: ClassVar[bool] = False

    @classmethod
    def resolve(cls, output: OutputSpec) -> Self:
        """Check the options every output may give: the layer options (see
        ``LayerOptions.parse``) and ``name=``, which must be an image reference."""
        opts = LayerOptions.parse(output, oci_media_types=cls.oci_media_types)
        if output.get("name"):
            parse_reference(output.get("name"))
        return cls(output, opts)

    @property
    def runs_last(self) -> bool:
        return self.output.pushes

    def watch(self, solve: SolveWatch) -> None:
        return None


async def export_files(
    parts: ExportParts, top: str | None, step: str, write: Callable[[Path], None]
) -> None:
    """Mount the result's files and hand their root to ``write`` (in a thread),
    as the progress step ``step``."""
    with ProgressStep(parts.events, step):
        async with parts.view(top) as root:
            await asyncio.to_thread(write, root)


def image_names(out: OutputSpec, tags: Sequence[str]) -> list[str]:
    """The names an image output gives its image: its ``name=``, else the tags."""
    names = [out.get("name")] if out.get("name") else list(tags)
    return [str(parse_reference(n)) for n in names]


def all_image_names(outputs: Sequence[OutputSpec], tags: Sequence[str]) -> list[str]:
    """Every name the build gives its image (the tags and each image output's),
    once each, in order: the metadata file's ``image.name``."""
    names = [str(parse_reference(t)) for t in tags]
    for out in outputs:
        if out.type in IMAGE_TYPES:
            names += image_names(out, tags)
    return list(dict.fromkeys(names))


async def push(result: ExportResult, parts: ExportParts, names: Sequence[str]) -> None:
    """Push the build's image under ``names`` with the parts' registry."""
    from ociworker.exporter.push import push_image

    assert result.image is not None
    if parts.registry is None:
        raise UnsupportedError("this worker cannot push: it was given no registry client")
    await push_image(
        parts.registry,
        parts.content,
        parts.sources,
        result.image,
        names,
        parts.events,
        parts.fetch_blob,
    )
