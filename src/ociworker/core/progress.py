"""Progress events streamed from the solver to whoever asked for the build (pure values)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ociworker.core.oci import (
    ANNOTATION_STEP_INDEX,
    ANNOTATION_UNCOMPRESSED,
    ANNOTATION_VERTEX_DIGEST,
    Descriptor,
)


def format_bytes(n: int) -> str:
    """``222298112`` -> ``212MiB``: binary units, at most one decimal, as a person reads them."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" or size >= 100 else f"{size:.3g}{unit}"
        size /= 1024
    return f"{size:.3g}TiB"


@dataclass(frozen=True)
class Usage:
    """What one RUN cost, read from its cgroup when it ended (``None``: the host
    does not account that figure, e.g. a cgroup v1 ``blkio`` that is not mounted).

    BuildKit reports such figures only through its history API; we put them on
    the step's status so every progress view and the metadata file can show them.
    """

    cpu_seconds: float | None = None
    peak_memory: int | None = None  # bytes
    read_bytes: int | None = None
    written_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.cpu_seconds is not None:
            d["cpu_seconds"] = round(self.cpu_seconds, 6)
        if self.peak_memory is not None:
            d["peak_memory_bytes"] = self.peak_memory
        if self.read_bytes is not None:
            d["read_bytes"] = self.read_bytes
        if self.written_bytes is not None:
            d["written_bytes"] = self.written_bytes
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Usage:
        def num(key: str) -> int | None:
            v = d.get(key)
            return int(v) if v is not None else None

        cpu = d.get("cpu_seconds")
        return cls(
            cpu_seconds=float(cpu) if cpu is not None else None,
            peak_memory=num("peak_memory_bytes"),
            read_bytes=num("read_bytes"),
            written_bytes=num("written_bytes"),
        )

    def summary(self) -> str:
        """``cpu 3.4s, mem 212MiB`` (the figures the host gave; I/O only when any)."""
        parts = []
        if self.cpu_seconds is not None:
            parts.append(f"cpu {self.cpu_seconds:.1f}s")
        if self.peak_memory is not None:
            parts.append(f"mem {format_bytes(self.peak_memory)}")
        if self.read_bytes:
            parts.append(f"read {format_bytes(self.read_bytes)}")
        if self.written_bytes:
            parts.append(f"written {format_bytes(self.written_bytes)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class VertexStatus:
    """A step changed state. ``started``/``completed`` are epoch seconds.

    ``usage`` is set on a status of its own that a RUN step sends when its
    process has ended (before its ``completed`` status); printers keep it and
    show it with the step's end.
    """

    digest: str
    name: str
    started: float | None = None
    completed: float | None = None
    cached: bool = False
    error: str | None = None
    usage: Usage | None = None

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
        if self.usage is not None:
            d["usage"] = self.usage.to_json()
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


#: BuildKit's default per-step log limit (``max-log-size``, 2 MiB)
DEFAULT_LOG_CAP = 2 << 20


def _bytes_size(n: int) -> str:
    """``2097152`` -> ``2MiB``, as go-units' BytesSize that BuildKit prints."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.4g}{unit}"
        size /= 1024
    return f"{size:.4g}TiB"


def clipped_line(limit: int) -> bytes:
    return f"\n[output clipped, log limit {_bytes_size(limit)} reached]\n".encode()


def cap_logs(sink: EventSink, limit: int = DEFAULT_LOG_CAP) -> EventSink:
    """``sink``, but each vertex's log data stops after ``limit`` bytes.

    A step that prints gigabytes would otherwise flood the terminal, the
    daemon's stream and the client's memory; past the cap one clear line says
    so (on stderr, as BuildKit does) and the rest is dropped. Statuses,
    warnings and infos always pass. ``limit <= 0`` means no cap.
    """
    if limit <= 0:
        return sink
    sent: dict[str, int] = {}

    def capped(ev: Event) -> None:
        if not isinstance(ev, VertexLog):
            sink(ev)
            return
        used = sent.get(ev.digest, 0)
        if used > limit:
            return  # already clipped
        room = limit - used
        if len(ev.data) <= room:
            sent[ev.digest] = used + len(ev.data)
            sink(ev)
            return
        if room:
            sink(VertexLog(ev.digest, ev.stream, ev.data[:room], ev.timestamp))
        sent[ev.digest] = limit + 1
        sink(VertexLog(ev.digest, 2, clipped_line(limit), ev.timestamp))

    return capped


def error_line(exc: BaseException) -> str:
    """The one line a failed step shows next to ``ERROR`` (``#N ERROR: ...``, the
    red line of the tty view): ``cancelled`` for a cancellation (whose text is
    empty, which would read as success), else the error's first non-empty line
    (a Dockerfile error adds its source line below; that belongs to the final
    error message, not to the step's status)."""
    if not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt, SystemExit
        return "cancelled"
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return "failed"


class ProgressStep:
    """A pseudo-step in the progress stream (loading the definition, exporting):
    started on entry, completed (with the error, if any) on exit."""

    def __init__(self, events: EventSink, name: str) -> None:
        self.events = events
        self.name = name
        self.digest = "export:" + uuid.uuid4().hex
        self.started = time.time()

    def __enter__(self) -> ProgressStep:
        self.events(VertexStatus(self.digest, self.name, started=self.started))
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.events(
            VertexStatus(
                self.digest,
                self.name,
                started=self.started,
                completed=time.time(),
                error=error_line(exc) if exc is not None else None,
            )
        )
