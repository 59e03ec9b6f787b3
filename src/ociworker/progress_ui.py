"""Progress printers: BuildKit-like ``tty``, ``plain``, ``rawjson`` and ``quiet``.

``rich`` is imported only by ``TTYPrinter``: a cached build printing plain
progress must not pay for it at start-up.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from ociworker.core.epoch import rfc3339
from ociworker.core.progress import (
    Event,
    Info,
    LayerCommitted,
    Usage,
    VertexLog,
    VertexStatus,
    Warning,
)
from ociworker.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live
    from rich.text import Text

PROGRESS_MODES = ("auto", "plain", "tty", "quiet", "rawjson")


class PlainPrinter:
    """BuildKit's plain format: ``#N [stage i/n] RUN ...``, log lines prefixed with
    elapsed seconds, ``#N CACHED``, ``#N DONE 0.3s``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._ids: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._usage: dict[str, Usage] = {}
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
        if ev.usage is not None and ev.completed is None:
            self._usage[ev.digest] = ev.usage  # shown on the step's DONE line
            return
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
            usage = self._usage.pop(ev.digest, None)
            figures = f" ({usage.summary()})" if usage is not None and usage.summary() else ""
            self._write(f"#{n} DONE {took:.1f}s{figures}")

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


# --- rawjson: BuildKit's SolveStatus --------------------------------------------------
#
# ``docker buildx build --progress=rawjson`` writes each ``client.SolveStatus`` it
# receives with Go's ``json.Encoder``: one compact object per line, keys in struct
# order, ``omitempty`` fields left out, ``[]byte`` as base64, ``time.Time`` as RFC 3339
# with nanoseconds (trailing zeros trimmed), always UTC off the wire. The types
# (moby/buildkit client/graph.go):
#   SolveStatus   {vertexes, statuses, logs, warnings}          all omitempty
#   Vertex        {digest, inputs, name, started, completed, cached, error}  all omitempty
#   VertexStatus  {id, vertex*, name*, total*, current, timestamp, started*, completed*}
#   VertexLog     {vertex*, stream*, data, timestamp}
#   VertexWarning {vertex*, level*, short*, detail*, url*}      (* = omitempty)
# A RUN's resource usage (BuildKit has no such event) is a finished status
# ``{"id": "resource usage: cpu 1.0s, mem 100MiB", "vertex": ...}`` of BuildKit's
# own shape: a BuildKit tool shows it as a line of the step. The exact figures
# are in the metadata file and the daemon's stream.
# ``Event.to_json`` is the daemon's own wire format and stays as it is; this is
# the view a BuildKit tool reading our stderr expects.


def go_time(t: float) -> str:
    """Epoch seconds as Go marshals a UTC ``time.Time``: RFC 3339, fraction of up
    to 9 digits with trailing zeros trimmed (none when whole), ``Z``."""
    # Our stamps come from time.time(): microseconds are all a float carries
    # faithfully at today's epoch, so round there instead of inventing nanoseconds.
    secs, us = divmod(round(t * 1_000_000), 1_000_000)
    return rfc3339(secs, us * 1000)


def vertex_digest(digest: str) -> str:
    """A vertex id as BuildKit spells one. Our pseudo-steps (``export:<uuid>``,
    ``context:<uuid>``) are not digests; they become the sha256 of their id, so
    every event of one step still names the same vertex."""
    if digest.startswith("sha256:"):
        return digest
    return "sha256:" + hashlib.sha256(digest.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def solve_status(ev: Event, *, now: float, vertex: str = "") -> dict[str, Any]:
    """``ev`` as one BuildKit ``SolveStatus`` (a dict to encode with ``go_json``).

    ``now`` stamps the events that carry no time of their own (infos, layers);
    ``vertex`` is the step an info without one belongs to (the printer knows
    which step is running). An info becomes a finished one-off status (as
    BuildKit reports ``transferring context:`` or ``writing image sha256:...``),
    a committed layer a status whose ``current`` and ``total`` are its size."""
    if isinstance(ev, VertexStatus) and ev.usage is not None and ev.completed is None:
        at = go_time(now)
        return {
            "statuses": [
                {
                    "id": "resource usage: " + ev.usage.summary(),
                    "vertex": vertex_digest(ev.digest),
                    "current": 0,
                    "timestamp": at,
                    "started": at,
                    "completed": at,
                }
            ]
        }
    if isinstance(ev, VertexStatus):
        v: dict[str, Any] = {"digest": vertex_digest(ev.digest)}
        if ev.name:
            v["name"] = ev.name
        if ev.started is not None:
            v["started"] = go_time(ev.started)
        if ev.completed is not None:
            v["completed"] = go_time(ev.completed)
        if ev.cached:
            v["cached"] = True
        if ev.error:
            v["error"] = ev.error
        return {"vertexes": [v]}
    if isinstance(ev, VertexLog):
        log: dict[str, Any] = {"vertex": vertex_digest(ev.digest)}
        if ev.stream:
            log["stream"] = ev.stream
        log["data"] = _b64(ev.data)
        log["timestamp"] = go_time(ev.timestamp)
        return {"logs": [log]}
    if isinstance(ev, Warning):
        # BuildKit's Dockerfile frontend reports its warnings at level 1
        w: dict[str, Any] = {"level": 1, "short": _b64(ev.message.encode())}
        if ev.detail:
            w["detail"] = [_b64(line.encode()) for line in ev.detail.splitlines()]
        return {"warnings": [w]}
    stamp = go_time(now)
    if isinstance(ev, Info):
        status: dict[str, Any] = {"id": ev.message}
        owner = ev.digest or vertex
        if owner:
            status["vertex"] = vertex_digest(owner)
        status.update(current=0, timestamp=stamp, started=stamp, completed=stamp)
        return {"statuses": [status]}
    d = ev.descriptor
    status = {"id": f"writing layer {d.digest}"}
    if ev.vertex:
        status["vertex"] = vertex_digest(ev.vertex)
    if d.size:
        status["total"] = d.size
    status.update(current=d.size, timestamp=stamp, started=stamp, completed=stamp)
    return {"statuses": [status]}


#: what Go's encoding/json escapes beyond JSON's minimum (HTML-safe output)
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def go_json(obj: Any) -> str:
    """``obj`` as Go's ``json.Encoder.Encode`` writes it, without the newline:
    compact, UTF-8 as is, ``<``, ``>``, ``&`` escaped."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).translate(_GO_ESCAPES)


class RawJSONPrinter:
    """``--progress=rawjson``: one BuildKit ``SolveStatus`` JSON object per line
    and nothing else on ``out`` (see ``solve_status``)."""

    def __init__(self, out: TextIO, *, wall: Callable[[], float] = time.time) -> None:
        self.out = out
        self._wall = wall
        self._running: list[str] = []  # started, not finished: newest last

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, VertexStatus) and ev.usage is None:
            if ev.digest in self._running:
                self._running.remove(ev.digest)
            if ev.started is not None and ev.completed is None and not ev.cached:
                self._running.append(ev.digest)
        owner = self._running[-1] if self._running else ""
        self.out.write(go_json(solve_status(ev, now=self._wall(), vertex=owner)) + "\n")
        self.out.flush()


def require_console(stream: TextIO) -> None:
    """Refuse ``--progress=tty`` when ``stream`` (stderr) is not a terminal, as
    buildx does (progressui.NewDisplay: ``failed to get console: provided file
    is not a console``) instead of drawing a live view into a file or a pipe.
    ``auto`` is the mode that falls back to ``plain``."""
    try:
        console = stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        console = False
    if not console:
        raise ConfigError("failed to get console: provided file is not a console")


class QuietPrinter:
    """Prints nothing while building; the CLI prints the image id at the end."""

    def __call__(self, ev: Event) -> None:
        return


# --- tty ---------------------------------------------------------------------------

#: CSI / OSC escape sequences a RUN may print (colours, cursor moves)
_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _clean(line: str) -> str:
    """One log line as it may appear inside the live view: a progress bar's
    ``\r`` rewrites keep their last state, escapes and controls are dropped so
    they cannot move the cursor under rich's feet."""
    line = line.rstrip("\r").rsplit("\r", 1)[-1]
    return _CONTROL_RE.sub("", _ANSI_RE.sub("", line)).expandtabs(4)


@dataclass
class _Step:
    name: str
    started: float | None = None
    completed: float | None = None
    cached: bool = False
    error: str | None = None
    info: str = ""
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=10))
    partial: dict[int, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.cached or self.completed is not None


class TTYPrinter:
    """buildx's tty view on a ``rich.live.Live``: a ``[+] Building 1.2s (3/5)``
    header, finished steps collapsed to one line, running steps with a timer
    and their last ``log_lines`` lines (dimmed), failed steps in red with
    their last lines kept, warnings at the end.

    Use it as a context manager around the build. Call it (and enter/exit it)
    from the event loop thread only: the state it renders is not locked, so
    rich's own refresh thread is off and a ``loop.call_later`` ticker moves the
    timers instead. Renders are limited to ``refresh_per_second`` whatever
    the rate of events, so a chatty RUN costs little CPU; ``clock`` (monotonic,
    for the limit) and ``wall`` (epoch, as event stamps) exist for tests.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        refresh_per_second: float = 10.0,
        log_lines: int = 6,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = console if console is not None else Console(stderr=True)
        self._interval = 1.0 / refresh_per_second
        self._log_lines = log_lines
        self._clock = clock
        self._wall = wall
        self._steps: dict[str, _Step] = {}
        self._order: list[str] = []  # digests in order of appearance
        self.warnings: list[str] = []
        self._begin = wall()
        self._last_render: float | None = None
        self._dirty = False
        self._final = False
        self._timer: asyncio.TimerHandle | None = None
        #: how many frames were rendered (the rate limit is tested on it)
        self.renders = 0
        self._live: Live = Live(
            console=self.console,
            auto_refresh=False,
            redirect_stdout=False,  # outputs may stream to stdout (dest=-)
            redirect_stderr=False,
            get_renderable=self._render,
        )

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> TTYPrinter:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._begin = self._wall()
        self._live.start()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # driven synchronously (tests): events alone refresh
        if loop is not None:
            self._timer = loop.call_later(self._interval, self._tick, loop)

    def stop(self) -> None:
        """Print the final state once (all steps, nothing cropped); restore the cursor.

        Idempotent, and safe on every way out: success, error, Ctrl-C."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._final:
            return
        self._final = True
        self._live.stop()  # renders one last time, then shows the cursor

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._final:
            return
        if self._dirty or any(s.started is not None and not s.done for s in self._steps.values()):
            self._refresh()
        self._timer = loop.call_later(self._interval, self._tick, loop)

    def _refresh(self) -> None:
        self._last_render = self._clock()
        self._dirty = False
        self._live.refresh()

    def _maybe_refresh(self) -> None:
        now = self._clock()
        last = self._last_render
        if last is None or now - last >= self._interval or now < last:
            self._refresh()
        else:
            self._dirty = True

    # -- events -------------------------------------------------------------------

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, VertexStatus):
            step = self._step(ev.digest, ev.name)
            step.name = ev.name or step.name
            if ev.started is not None and step.started is None:
                step.started = ev.started
            step.completed = ev.completed if ev.completed is not None else step.completed
            step.cached = step.cached or ev.cached
            step.error = ev.error or step.error
            if step.done:
                self._flush_partial(step)
        elif isinstance(ev, VertexLog):
            self._log(self._step(ev.digest, ""), ev)
        elif isinstance(ev, Warning):
            self.warnings.append(ev.message)
        elif isinstance(ev, Info):
            target = self._steps.get(ev.digest) if ev.digest else self._latest_running()
            if target is not None:
                target.info = _clean(ev.message)
        elif isinstance(ev, LayerCommitted) and ev.vertex in self._steps:
            self._steps[ev.vertex].info = f"layer {ev.descriptor.digest[:19]} written"
        if not self._final:
            self._maybe_refresh()

    def _step(self, digest: str, name: str) -> _Step:
        step = self._steps.get(digest)
        if step is None:
            step = self._steps[digest] = _Step(name)
            self._order.append(digest)
        return step

    def _latest_running(self) -> _Step | None:
        for digest in reversed(self._order):
            step = self._steps[digest]
            if step.started is not None and not step.done:
                return step
        return None

    def _log(self, step: _Step, ev: VertexLog) -> None:
        text = step.partial.pop(ev.stream, "") + ev.data.decode("utf-8", "replace")
        *lines, rest = text.split("\n")
        step.lines.extend(_clean(line) for line in lines)
        if rest:
            step.partial[ev.stream] = rest

    def _flush_partial(self, step: _Step) -> None:
        for stream in sorted(step.partial):
            step.lines.append(_clean(step.partial.pop(stream)))

    # -- rendering ----------------------------------------------------------------

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        self.renders += 1
        now = self._wall()
        steps = [self._steps[d] for d in self._order]
        done = sum(1 for s in steps if s.done)
        header = Text(f"[+] Building {max(0.0, now - self._begin):.1f}s ({done}/{len(steps)})")
        if self._final:
            header.append(" FINISHED")
        rows: list[tuple[Text, Text]] = []
        for step in steps:
            rows.extend(self._rows(step, now))
        if not self._final:
            # While live, show the tail that fits: that is where the running steps are.
            room = max(1, self.console.size.height - 2)
            rows = rows[-room:]
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True)
        for left, right in rows:
            grid.add_row(left, right)
        parts: list[RenderableType] = [header, grid]
        if self._final:
            parts.extend(self._error_blocks(steps))
            if self.warnings:
                n = len(self.warnings)
                parts.append(Text(f"\n {n} warning{'s' if n > 1 else ''} found:", style="yellow"))
                parts.extend(Text(f" - {w}", style="yellow") for w in self.warnings)
        return Group(*parts)

    def _rows(self, step: _Step, now: float) -> list[tuple[Text, Text]]:
        from rich.text import Text

        if step.started is None and not step.cached:
            return []  # known only from a log or an info so far
        if step.cached:
            return [(Text(f" => CACHED {step.name}", style="blue"), Text("0.0s", style="blue"))]
        end = step.completed if step.completed is not None else now
        took = Text(f"{max(0.0, end - (step.started or end)):.1f}s")
        if step.error:
            took.stylize("red")
            rows = [(Text(f" => ERROR {step.name}", style="red"), took)]
            if not self._final:  # the final view has the error block instead
                rows.extend(self._log_rows(step, "red dim"))
            return rows
        if step.completed is not None:
            return [(Text(f" => {step.name}", style="blue"), Text(took.plain, style="blue"))]
        rows = [(Text(f" => {step.name}"), took)]
        if step.info:
            rows.append((Text(f" => => {step.info}", style="dim"), Text("")))
        rows.extend(self._log_rows(step, "dim"))
        return rows

    def _log_rows(self, step: _Step, style: str) -> list[tuple[Text, Text]]:
        from rich.text import Text

        shown = list(step.lines)[-self._log_lines :] if self._log_lines > 0 else []
        return [(Text(f" => => # {line}", style=style), Text("")) for line in shown]

    def _error_blocks(self, steps: list[_Step]) -> list[Text]:
        from rich.text import Text

        out: list[Text] = []
        for step in steps:
            if not step.error or step.error == "cancelled":
                continue
            block = Text("------\n", style="red")
            block.append(f" > {step.name}:\n", style="red")
            for line in step.lines:
                block.append(f"{line}\n", style="red dim")
            block.append("------", style="red")
            out.append(block)
        return out
