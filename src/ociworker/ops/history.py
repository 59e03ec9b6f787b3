"""What a build's history record is made of, gathered while it runs: each
step's statuses (from the progress events), and at the end each step's cache
key with the inputs that made it (the op, its inputs' keys, the context files
its key covered, by name and digest)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ociworker.core.digest import digest_of
from ociworker.core.graph import Copy, ExecOp, FileOp, SourceOp, Vertex
from ociworker.core.history import BuildRecord, StepRecord
from ociworker.core.progress import Event, EventSink, LayerCommitted, VertexLog, VertexStatus
from ociworker.ops.context import ContextChecksums, LocalContext
from ociworker.ops.exec import ExecHandler
from ociworker.ops.file import FileHandler
from ociworker.solver.scheduler import Job

#: log bytes a build's record keeps (``history logs``), over all its steps
MAX_LOG_BYTES = 16 << 20


@dataclass
class _Status:
    name: str
    started: float | None = None
    completed: float | None = None
    cached: bool = False
    error: str = ""
    usage: dict[str, Any] = field(default_factory=dict)


class BuildRecorder:
    """Collects one build's record; ``sink`` wraps the build's events."""

    def __init__(
        self,
        *,
        dockerfile: str,
        context: str,
        target: str,
        build_args: Mapping[str, str],
        no_cache: bool,
        checksums: ContextChecksums,
    ) -> None:
        # the handlers' own: their per-file memo has what the keys just read
        self._checksums = checksums
        self.id = uuid.uuid4().hex[:25]
        self.created = time.time()
        self.dockerfile = dockerfile
        self.context = context
        self.target = target
        self.build_args = dict(build_args)
        self.no_cache = no_cache
        self.dockerfile_digest = ""
        self.events: list[dict[str, Any]] = []
        self._status: dict[str, _Status] = {}
        self._log_bytes = 0
        #: the build's graph and job, once known (a build refused before it
        #: solves records its pseudo-steps only)
        self.graph: Vertex | None = None
        self.job: Job | None = None

    def sink(self, events: EventSink) -> EventSink:
        def record(ev: Event) -> None:
            if isinstance(ev, VertexLog):
                self._keep_log(ev)
            elif not isinstance(ev, LayerCommitted):
                self.events.append(ev.to_json())
            if isinstance(ev, VertexStatus):
                st = self._status.setdefault(ev.digest, _Status(ev.name))
                if ev.started is not None and st.started is None:
                    st.started = ev.started
                    # a step shown before the build began (a daemon's context sync)
                    self.created = min(self.created, ev.started)
                if ev.completed is not None:
                    st.completed = ev.completed
                st.cached = st.cached or ev.cached
                if ev.error:
                    st.error = ev.error
                if ev.usage is not None:
                    st.usage = ev.usage.to_json()
            events(ev)

        return record

    def _keep_log(self, ev: VertexLog) -> None:
        # Each step's log is capped already; many steps could still fill the
        # store, so a record keeps at most MAX_LOG_BYTES of them, then says so.
        if self._log_bytes > MAX_LOG_BYTES:
            return
        self._log_bytes += len(ev.data)
        if self._log_bytes > MAX_LOG_BYTES:
            note = f"\n[history: logs clipped, {MAX_LOG_BYTES >> 20}MiB kept per build]\n"
            ev = VertexLog(ev.digest, 2, note.encode(), ev.timestamp)
        self.events.append(ev.to_json())

    async def finish(
        self,
        graph: Vertex | None,
        job: Job | None,
        outputs: Mapping[str, str],
        error: str,
        known: Mapping[str, Mapping[str, str]] | None = None,
    ) -> BuildRecord:
        """The record. ``known``: cache key -> the files an earlier record noted
        for it (a key covers the same files: they are not walked again)."""
        known = known or {}
        vertices: dict[str, Vertex] = {v.digest: v for v in graph.walk()} if graph else {}
        steps: list[StepRecord] = []
        for digest, st in self._status.items():
            step = StepRecord(
                digest=digest,
                name=st.name,
                started=st.started,
                completed=st.completed,
                cached=st.cached,
                error=st.error,
                usage=st.usage,
            )
            v = vertices.get(digest)
            key = job.keys.get(v.digest) if v is not None and job is not None else None
            if v is not None and job is not None and key is not None:
                old = known.get(key)
                files = (
                    dict(old)
                    if old is not None
                    else await asyncio.to_thread(_files, v, job, self._checksums)
                )
                step = replace(
                    step,
                    key=key,
                    op=v.op.to_json(),
                    inputs=tuple(i.digest if i is not None else "" for i in v.inputs),
                    input_keys=tuple(
                        _input_key(i, job, digest_of(files)) if i is not None else ""
                        for i in v.inputs
                    ),
                    files=files,
                    cache_ignored=v.ignore_cache,
                )
            steps.append(step)
        return BuildRecord(
            id=self.id,
            created=self.created,
            completed=time.time(),
            dockerfile=self.dockerfile,
            dockerfile_digest=self.dockerfile_digest,
            context=self.context,
            target=self.target,
            build_args=self.build_args,
            no_cache=self.no_cache,
            steps=tuple(steps),
            outputs=dict(outputs),
            error=error,
        )


def _is_local(v: Vertex) -> bool:
    return isinstance(v.op, SourceOp) and v.op.identifier.startswith("local://")


def _input_key(inp: Vertex, job: Job, files_digest: str) -> str:
    # A local context's key is the content the step selects from it (what the
    # step's own key covered), not the source vertex's key, which never changes.
    if _is_local(inp):
        return files_digest
    return job.keys.get(inp.digest, "")


def _files(v: Vertex, job: Job, checksums: ContextChecksums) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, inp in enumerate(v.inputs):
        if inp is None or not _is_local(inp):
            continue
        assert isinstance(inp.op, SourceOp)
        name = inp.op.identifier.removeprefix("local://")
        ctx = job.locals.get(name)
        if not isinstance(ctx, LocalContext):
            continue
        copies: list[Copy] = []
        if isinstance(v.op, ExecOp):
            copies = ExecHandler.selected(v.op, i)
        elif isinstance(v.op, FileOp):
            copies = FileHandler.selected(v.op, i)
        prefix = "" if name == "context" else f"{name}:"
        for path, d in checksums.selected_files(ctx, copies).items():
            out[prefix + path] = d
    return out
