"""Progress events streamed from the solver to whoever asked for the build (pure values)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ociworker.core.oci import (
    ANNOTATION_STEP_INDEX,
    ANNOTATION_UNCOMPRESSED,
    ANNOTATION_VERTEX_DIGEST,
    Descriptor,
)


@dataclass(frozen=True)
class VertexStatus:
    """A step changed state. ``started``/``completed`` are epoch seconds."""

    digest: str
    name: str
    started: float | None = None
    completed: float | None = None
    cached: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"digest": self.digest, "name": self.name}
        if self.started is not None:
            d["started"] = self.started
        if self.completed is not None:
            d["completed"] = self.completed
        if self.cached:
            d["cached"] = True
        if self.error:
            d["error"] = self.error
        return {"vertex": d}


@dataclass(frozen=True)
class VertexLog:
    digest: str
    stream: int  # 1 stdout, 2 stderr
    data: bytes
    timestamp: float

    def to_json(self) -> dict[str, Any]:
        return {
            "log": {
                "vertex": self.digest,
                "stream": self.stream,
                "data": self.data.decode("utf-8", "replace"),
                "timestamp": self.timestamp,
            }
        }


@dataclass(frozen=True)
class Warning:
    message: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"warning": {"message": self.message, "detail": self.detail}}


@dataclass(frozen=True)
class Info:
    """A free-form progress line (e.g. ``transferring context: 12.3kB``)."""

    message: str
    digest: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"info": {"message": self.message, "vertex": self.digest}}


@dataclass(frozen=True)
class LayerCommitted:
    """A built step's layer blob exists (and was written to a ``type=layers`` output).

    ``descriptor`` is the OCI descriptor of the compressed blob; its annotations
    carry the diffID, the step index (1-based, counting the steps built on top
    of the base image in the final stage's chain) and the vertex digest and name.
    """

    descriptor: Descriptor

    def annotation(self, key: str) -> str:
        return dict(self.descriptor.annotations).get(key, "")

    @property
    def diff_id(self) -> str:
        return self.annotation(ANNOTATION_UNCOMPRESSED)

    @property
    def index(self) -> int:
        text = self.annotation(ANNOTATION_STEP_INDEX)
        return int(text) if text.isdigit() else 0

    @property
    def vertex(self) -> str:
        return self.annotation(ANNOTATION_VERTEX_DIGEST)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.descriptor.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerCommitted:
        """The inverse of ``to_json`` (a client reading a streamed event back)."""
        return cls(Descriptor.from_json(d["layer"]))


Event = VertexStatus | VertexLog | Warning | Info | LayerCommitted
EventSink = Callable[[Event], None]


def discard(_: Event) -> None:
    """An EventSink that drops everything."""
