"""Progress printers: BuildKit-like ``plain``, ``rawjson`` and ``quiet``."""

from __future__ import annotations

import json
import time
from typing import TextIO

from ociworker.core.progress import Event, Info, LayerCommitted, VertexLog, VertexStatus, Warning


class PlainPrinter:
    """BuildKit's plain format: ``#N [stage i/n] RUN ...``, log lines prefixed with
    elapsed seconds, ``#N CACHED``, ``#N DONE 0.3s``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._ids: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._partial: dict[tuple[str, int], bytes] = {}
        self._last: str | None = None
        self.warnings: list[str] = []

    def _id(self, digest: str, name: str) -> tuple[int, bool]:
        n = self._ids.get(digest)
        if n is None:
            n = len(self._ids) + 1
            self._ids[digest] = n
            return n, True
        return n, False

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, VertexStatus):
            self._status(ev)
        elif isinstance(ev, VertexLog):
            self._log(ev)
        elif isinstance(ev, Warning):
            self.warnings.append(ev.message)
            self._write(f"WARNING: {ev.message}")
        elif isinstance(ev, Info):
            if ev.digest and ev.digest in self._ids:
                self._write(f"#{self._ids[ev.digest]} {ev.message}")
            else:
                self._write(ev.message)
        elif isinstance(ev, LayerCommitted):
            d = ev.descriptor
            text = f"layer {d.digest} written ({d.size} bytes)"
            self._write(f"#{self._ids[ev.vertex]} {text}" if ev.vertex in self._ids else text)
        self.out.flush()

    def _status(self, ev: VertexStatus) -> None:
        n, new = self._id(ev.digest, ev.name)
        if new or self._last != ev.digest:
            self._write(f"\n#{n} {ev.name}" if new else f"#{n} ...")
        self._last = ev.digest
        if ev.started is not None and ev.digest not in self._started:
            self._started[ev.digest] = ev.started
        if ev.cached:
            self._write(f"#{n} CACHED")
        elif ev.error:
            self._flush_partial(ev.digest, n)
            self._write(f"#{n} ERROR: {ev.error}")
        elif ev.completed is not None:
            self._flush_partial(ev.digest, n)
            took = ev.completed - (ev.started or ev.completed)
            self._write(f"#{n} DONE {took:.1f}s")

    def _log(self, ev: VertexLog) -> None:
        n, new = self._id(ev.digest, "")
        if self._last != ev.digest and not new:
            self._write(f"#{n} ...")
        self._last = ev.digest
        data = self._partial.pop((ev.digest, ev.stream), b"") + ev.data
        *lines, rest = data.split(b"\n")
        if rest:
            self._partial[(ev.digest, ev.stream)] = rest
        elapsed = ev.timestamp - self._started.get(ev.digest, ev.timestamp)
        for line in lines:
            self._write(f"#{n} {elapsed:.3f} {line.decode('utf-8', 'replace')}")

    def _flush_partial(self, digest: str, n: int) -> None:
        for stream in (1, 2):
            rest = self._partial.pop((digest, stream), b"")
            if rest:
                elapsed = time.time() - self._started.get(digest, time.time())
                self._write(f"#{n} {elapsed:.3f} {rest.decode('utf-8', 'replace')}")

    def _write(self, text: str) -> None:
        self.out.write(text.lstrip("\n") if not self._ids or text == "" else text)
        self.out.write("\n")


class RawJSONPrinter:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, ev: Event) -> None:
        self.out.write(json.dumps(ev.to_json()) + "\n")
        self.out.flush()


class QuietPrinter:
    """Prints nothing while building; the CLI prints the image id at the end."""

    def __call__(self, ev: Event) -> None:
        return
