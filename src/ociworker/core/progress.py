"""Progress events streamed from the solver to whoever asked for the build (pure values)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


Event = VertexStatus | VertexLog | Warning | Info
EventSink = Callable[[Event], None]


def discard(_: Event) -> None:
    """An EventSink that drops everything."""
