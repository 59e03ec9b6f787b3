"""The ``Control`` service: builds, their event streams, du / prune / info, sessions.

One ``Worker`` serves every build, so identical steps of concurrent builds run
once (the solver dedups by cache key) and a build cancelled by its client
cancels a shared step only with its last waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import grpc
from google.protobuf.message import DecodeError

from ociworker import controller
from ociworker.api import errors as api_errors
from ociworker.api.convert import event_to_proto, usage_record_to_proto
from ociworker.api.session import SessionHub, WorkerSession
from ociworker.api.v1 import control_pb2 as pb
from ociworker.api.v1 import control_pb2_grpc as pb_grpc
from ociworker.core.build import (
    BuildDefinition,
    BuildRequest,
    NamedContext,
    PruneFilter,
    Ulimit,
    parse_add_host,
)
from ociworker.core.cacheimport import parse_cache_specs
from ociworker.core.entitlements import parse_entitlements
from ociworker.core.gc import GCConfig, PruneOptions
from ociworker.core.outputs import OUTPUT_TYPES, OutputSpec
from ociworker.core.progress import (
    DEFAULT_LOG_CAP,
    Event,
    EventSink,
    Info,
    LayerCommitted,
    VertexStatus,
)
from ociworker.core.units import human_size
from ociworker.errors import (
    BuildCancelled,
    ConfigError,
    DockerfileError,
    NotFoundError,
    OciworkerError,
    UserError,
    WorkerRefused,
)
from ociworker.fs.paths import check_relative_name
from ociworker.fs.userns import rootless
from ociworker.log import get_logger
from ociworker.session.filesync import ContextStore
from ociworker.version import __version__
from ociworker.worker import HistoryStore as SQLiteHistoryLike
from ociworker.worker import Worker

_log = get_logger("ociworker.api.server")

_FINISHED_KEPT = 100  # finished builds Status can still replay
_OUTPUT_CREDITS = 32  # output chunks in flight per build (backpressure on exporters)
_CHUNK = 256 * 1024
_SPARE_CONTEXTS = 3  # extra copies of one context, for concurrent builds of it


def build_definition(request: pb.SolveRequest) -> BuildDefinition:
    """The Dockerfile the client read for this build, checked as the embedded
    path checks a file it reads (``session.context.read_dockerfile``)."""
    name = request.dockerfile_name or "Dockerfile"
    if "/" in name:
        raise ConfigError(f"invalid dockerfile name {name!r}: want a file name")
    check_relative_name(name)
    try:
        text = request.dockerfile.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DockerfileError(f"{name} is not UTF-8 text: {exc}") from None
    return BuildDefinition(
        text, name, tuple(request.ignore_patterns), source=bytes(request.definition)
    )


class _Build:
    """One build's progress, kept for ``Status`` (replay, then follow)."""

    def __init__(self, build_id: str) -> None:
        self.id = build_id
        self.history: list[pb.SolveEvent] = []
        self.followers: set[asyncio.Queue[pb.SolveEvent | None]] = set()
        self.done = False
        self.result: pb.SolveResult | None = None
        self.error: OciworkerError | None = None

    def publish(self, msg: pb.SolveEvent) -> None:
        self.history.append(msg)
        for q in self.followers:
            q.put_nowait(msg)

    def finish(self, result: pb.SolveResult | None, error: OciworkerError | None) -> None:
        self.done = True
        self.result = result
        self.error = error
        for q in self.followers:
            q.put_nowait(None)


class _OutputStream(io.RawIOBase):
    """A writable file whose bytes become OutputChunk messages of one output.

    Written from an exporter thread; a threading semaphore of credits, given
    back as the messages are sent, keeps the exporter from outrunning the
    client. ``abort`` wakes a blocked writer when the build goes away.
    """

    def __init__(
        self,
        index: int,
        send: Callable[[pb.SolveEvent], None],
        credits: threading.Semaphore,
        aborted: threading.Event,
    ) -> None:
        super().__init__()
        self._index = index
        self._send = send
        self._credits = credits
        self._aborted = aborted

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        for i in range(0, len(data), _CHUNK):
            self._chunk(data[i : i + _CHUNK], eof=False)
        return len(data)

    def _chunk(self, data: bytes, *, eof: bool) -> None:
        while not self._credits.acquire(timeout=0.2):
            if self._aborted.is_set():
                raise BuildCancelled("build cancelled while its output was streamed")
        self._send(pb.SolveEvent(output=pb.OutputChunk(output=self._index, data=data, eof=eof)))

    def end(self) -> None:
        self._chunk(b"", eof=True)


class _StreamTarget:
    """The daemon's ``ExportTarget``: every output goes to the client as
    messages of the Solve stream (archives as bytes, ``local`` as a tar, layers
    as their JSON then blob); the client writes them with the same functions
    ``LocalExportTarget`` uses."""

    def __init__(
        self,
        outputs: list[OutputSpec],
        send: Callable[[pb.SolveEvent], None],
        credits: threading.Semaphore,
        aborted: threading.Event,
    ) -> None:
        self._outputs = outputs
        self._send = send
        self._credits = credits
        self._aborted = aborted

    def _output_stream(self, out: OutputSpec) -> _OutputStream:
        return _OutputStream(self._outputs.index(out), self._send, self._credits, self._aborted)

    @contextlib.contextmanager
    def stream(self, out: OutputSpec) -> Iterator[BinaryIO]:
        raw = self._output_stream(out)
        buf = io.BufferedWriter(raw, buffer_size=_CHUNK)
        # on an error no eof is sent: the client discards what it received
        yield cast(BinaryIO, buf)
        buf.flush()
        raw.end()

    def local(self, out: OutputSpec, root: Path) -> None:
        from ociworker.exporter.fs import export_tar

        with self.stream(out) as f:
            export_tar(root, f)

    def layer(self, out: OutputSpec, layer: LayerCommitted, blob: BinaryIO) -> None:
        index = self._outputs.index(out)
        head = json.dumps(layer.to_json()).encode()
        digest = layer.descriptor.digest
        while True:
            data = blob.read(_CHUNK)
            self._credits_acquire()
            self._send(
                pb.SolveEvent(
                    layer=pb.LayerChunk(
                        output=index, digest=digest, layer_json=head, data=data, eof=not data
                    )
                )
            )
            head = b""
            if not data:
                return

    def _credits_acquire(self) -> None:
        while not self._credits.acquire(timeout=0.2):
            if self._aborted.is_set():
                raise BuildCancelled("build cancelled while its layers were streamed")


class ControlService:
    """Implements ``ociworker.v1.Control`` (registered with ``add_to_server``).

    Streaming methods write with ``context.write`` rather than yielding, so a
    failure can still set the status and its typed detail after the stream.
    """

    def __init__(
        self, worker: Worker, *, log_cap: int = DEFAULT_LOG_CAP, gc: GCConfig | None = None
    ) -> None:
        self.worker = worker
        self.log_cap = log_cap
        self.gc = gc if gc is not None else GCConfig(enabled=False)
        self._gc_task: asyncio.Task[None] | None = None
        self._gc_again = False
        self._gc_full = False
        self.sessions = SessionHub()
        self.contexts = ContextStore(worker.root / "contexts")
        self._builds: OrderedDict[str, _Build] = OrderedDict()
        self._tasks: set[asyncio.Task[pb.SolveResult]] = set()
        #: set when the daemon stops: a Solve then is refused, not started and cancelled
        self.closing = False

    # -- GC: after builds and on a timer (buildkitd's throttled GC) ---------------------

    async def gc_every(self, interval: float) -> None:
        while True:
            self.gc_soon()
            await asyncio.sleep(interval)

    def gc_soon(self, *, skip_unchanged: bool = False) -> None:
        """A GC pass in the background; one at a time (a request during a pass
        runs one more after it, so the last build's records are counted).
        ``skip_unchanged``: the pass may end at once when no record was written
        since the last one (``gc.collect``); a full pass asked for meanwhile wins."""
        if not self.gc.enabled:
            return
        if self._gc_task is not None and not self._gc_task.done():
            self._gc_again = True
            self._gc_full = self._gc_full or not skip_unchanged
            return
        self._gc_full = not skip_unchanged
        self._gc_task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        again = True
        while again:
            self._gc_again = False
            skip, self._gc_full = not self._gc_full, False
            try:
                st = os.statvfs(self.worker.root)
                policies = self.gc.effective(st.f_blocks * st.f_frsize)
                await controller.collect_garbage(
                    self.worker, policies, self.contexts.root, skip_unchanged=skip
                )
            except Exception as exc:  # GC must never take the daemon down
                _log.warning("gc failed", error=str(exc))
            again = self._gc_again

    async def cancel_all(self) -> None:
        """Cancel every running build and wait until each has released what it held;
        builds asked for from now on are refused (a fleet client takes them elsewhere)."""
        self.closing = True
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task
        tasks = list(self._tasks)
        for t in tasks:
            # Once only: a second cancel would cut short the (shielded) cleanup
            # the first one started, leaving it to run detached from the task.
            if not t.cancelling():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- Solve / Status ----------------------------------------------------------------

    async def Solve(  # gRPC method names are CamelCase
        self, request: pb.SolveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.closing:
            # before anything is recorded or run: the client may hand the build
            # to another worker without it ever running twice
            await _abort(context, WorkerRefused("the daemon is shutting down"))
            return
        build_id = request.build_id or uuid.uuid4().hex
        old = self._builds.get(build_id)
        if old is not None and not old.done:
            await _abort(context, UserError(f"build id {build_id!r} is already running"))
            return
        rec = _Build(build_id)
        self._builds[build_id] = rec
        # which worker of a fleet took which build, on the worker's side
        _log.info("build accepted", build=build_id, context_key=request.context_key)
        self._forget_old()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[pb.SolveEvent | None] = asyncio.Queue()
        credits = threading.Semaphore(_OUTPUT_CREDITS)
        aborted = threading.Event()

        def send_from_thread(msg: pb.SolveEvent) -> None:
            loop.call_soon_threadsafe(out.put_nowait, msg)

        def progress(ev: Event) -> None:
            msg = event_to_proto(ev)
            rec.publish(msg)
            out.put_nowait(msg)

        task = asyncio.create_task(
            self._run(request, rec.id, progress, send_from_thread, credits, aborted)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # the record ends when the task has unwound (containers killed, mounts released)
        task.add_done_callback(lambda t: rec.finish(_result_of(t), _error_of(t)))
        task.add_done_callback(lambda _t: out.put_nowait(None))
        try:
            while (msg := await out.get()) is not None:
                await context.write(msg)
                if msg.WhichOneof("event") in ("output", "layer"):
                    credits.release()
        finally:
            aborted.set()
            if not task.done():
                # the client went away (or the daemon stops): cancel and wait
                # for the build to release what it holds before returning
                if not task.cancelling():
                    task.cancel()
                await asyncio.wait({task})
        error = _error_of(task)
        if error is not None:
            await _abort(context, error)
            return
        await context.write(pb.SolveEvent(result=rec.result))

    async def _run(
        self,
        request: pb.SolveRequest,
        build_id: str,
        events: EventSink,
        send: Callable[[pb.SolveEvent], None],
        credits: threading.Semaphore,
        aborted: threading.Event,
    ) -> pb.SolveResult:
        session = self.sessions.get(request.session_id)
        remote = request.context_url
        # A fetched context's Dockerfile is read by the worker from it, unless
        # the client sent one (-f -); its name is then a path inside the context.
        definition = build_definition(request) if not remote or request.dockerfile else None
        outputs = [OutputSpec(o.type, tuple(sorted(o.attrs.items()))) for o in request.outputs]
        for o in outputs:
            if o.type not in OUTPUT_TYPES:
                raise ConfigError(f"unknown output type {o.type!r}")

        target = _StreamTarget(outputs, send, credits, aborted)

        key = request.context_key or session.id
        # the steps before the build (syncing contexts) belong to its history record
        early: list[Event] = []

        def noted(ev: Event) -> None:
            early.append(ev)
            events(ev)

        async with contextlib.AsyncExitStack() as stack:
            ctx, sent = Path("."), 0
            if not remote:
                ctx, sent = await self._sync_context(stack, session, key, noted)
            named: list[NamedContext] = []
            for cname, value in sorted(request.build_contexts.items()):
                nc = await self._named_context(stack, session, key, cname, value, noted)
                named.append(nc)
            req = BuildRequest(
                context=ctx,
                context_url=remote,
                dockerfile=(
                    Path(request.dockerfile_name)
                    if remote and definition is None and request.dockerfile_name
                    else None
                ),
                tags=tuple(request.tags),
                build_args=dict(request.build_args),
                target=request.target,
                outputs=tuple(outputs),
                no_cache=request.no_cache,
                network=request.network or "default",
                ulimits=tuple(Ulimit.parse(u) for u in request.ulimits),
                shm_size=request.shm_size or None,
                want_image=request.want_metadata,
                log_cap=self.log_cap,
                allow=parse_entitlements(request.allow, "the build's --allow"),
                extra_hosts=tuple(parse_add_host(h) for h in request.extra_hosts),
                cache_to=parse_cache_specs(request.cache_to, export=True, over_daemon=True),
                cache_from=parse_cache_specs(request.cache_from, export=False, over_daemon=True),
                annotations=tuple(request.annotations),
                labels=dict(request.labels),
                build_contexts=tuple(named),
                explain_cache=request.explain_cache,
                verify_cache=request.verify_cache,
                pull=request.pull,
                no_cache_filter=tuple(request.no_cache_filter),
                frontend=request.frontend,
                frontend_opts=dict(request.frontend_opts),
            )
            try:
                result = await controller.build(
                    self.worker,
                    req,
                    definition,
                    events,
                    target=target,
                    credentials=session,
                    secrets=session,
                    ssh=session,
                    prelude=tuple(early),
                )
            finally:
                # A rebuild that wrote no record and synced no file leaves nothing new
                # to collect: its pass is one query (the timer's passes stay full).
                self.gc_soon(skip_unchanged=sent == 0 and not named)
        metadata = dict(result.metadata)
        metadata["ociworker.context.bytes_sent"] = sent
        return pb.SolveResult(
            manifest_digest=result.manifest.digest if result.manifest else "",
            config_digest=result.config_digest or "",
            metadata_json=json.dumps(metadata).encode(),
        )

    async def _named_context(
        self,
        stack: contextlib.AsyncExitStack,
        session: WorkerSession,
        key: str,
        name: str,
        value: str,
        events: EventSink,
    ) -> NamedContext:
        """A ``--build-context`` of the request: a DIR (``local:DIRNAME``) is
        synced from the session like the main context."""
        if value.startswith("local:"):
            dir_name = value.removeprefix("local:")
            path, _ = await self._sync_context(
                stack,
                session,
                f"{key}:{dir_name}",
                events,
                dir_name=dir_name,
                shown=f"[internal] load build context {name}",
            )
            return NamedContext(name, "local", str(path))
        nc = NamedContext.of(name, value)
        if nc.kind in ("local", "oci-layout"):
            # a path would name the daemon's own files, which a client must not read
            raise ConfigError(
                f"--build-context {name}={value}: a {nc.kind} context must be sent "
                "through the session, not named by path"
            )
        return nc

    async def _sync_context(
        self,
        stack: contextlib.AsyncExitStack,
        session: WorkerSession,
        key: str,
        events: EventSink,
        dir_name: str = "context",
        shown: str = "[internal] load build context",
    ) -> tuple[Path, int]:
        digest = "context:" + uuid.uuid4().hex
        name = shown
        started = time.time()
        events(VertexStatus(digest, name, started=started))
        try:
            stats = await session.stat(dir_name)
            # Held (open) until the build ends: the key's lock keeps another sync
            # from changing the dir this build reads; a second build of the same
            # context takes a spare copy instead of queueing behind this one.
            transfer = await self.contexts.abegin(key, stats, spare_copies=_SPARE_CONTEXTS)
            stack.enter_context(transfer)
            await session.fetch(dir_name, transfer)
            path = await asyncio.to_thread(transfer.finish)
        except BaseException as exc:
            err = str(exc) if not isinstance(exc, asyncio.CancelledError) else "cancelled"
            events(VertexStatus(digest, name, started, completed=time.time(), error=err))
            raise
        sent = transfer.bytes_received
        took = time.time() - started
        events(Info(f"transferring context: {human_size(sent)} {took:.1f}s", digest))
        events(VertexStatus(digest, name, started=started, completed=time.time()))
        return path, sent

    def _forget_old(self) -> None:
        finished = [k for k, b in self._builds.items() if b.done]
        for k in finished[: max(0, len(finished) - _FINISHED_KEPT)]:
            del self._builds[k]

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        rec = self._builds.get(request.build_id)
        if rec is None:
            await _abort(context, NotFoundError(f"no build {request.build_id!r}"))
            return
        q: asyncio.Queue[pb.SolveEvent | None] = asyncio.Queue()
        replay = list(rec.history)
        if not rec.done:
            rec.followers.add(q)
        else:
            q.put_nowait(None)
        try:
            for msg in replay:
                await context.write(msg)
            while (follow := await q.get()) is not None:
                await context.write(follow)
        finally:
            rec.followers.discard(q)
        if rec.error is not None:
            await _abort(context, rec.error)
        elif rec.result is not None:
            await context.write(pb.SolveEvent(result=rec.result))

    # -- du / prune / info ---------------------------------------------------------------

    async def DiskUsage(
        self, request: pb.DiskUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DiskUsageResponse:
        records = await controller.disk_usage(self.worker, self.contexts.root)
        return pb.DiskUsageResponse(records=[usage_record_to_proto(r) for r in records])

    async def Prune(
        self, request: pb.PruneRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PruneResponse:
        try:
            opts = PruneOptions(
                filter=PruneFilter.parse(list(request.filters)),
                all=request.all,
                keep_storage=max(0, request.keep_storage),
                keep_duration=max(0.0, request.keep_duration),
            )
            removed = await controller.prune(self.worker, opts, self.contexts.root)
        except OciworkerError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.PruneResponse(
            removed=len(removed),
            freed=sum(r.size for r in removed),
            records=[usage_record_to_proto(r) for r in removed],
        )

    # -- build history -------------------------------------------------------------------

    def _history(self) -> SQLiteHistoryLike:
        history = self.worker.history
        if history is None:
            raise NotFoundError("this worker keeps no build history")
        return history

    async def ListHistory(
        self, request: pb.HistoryListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HistoryListResponse:
        try:
            records = self._history().records()
        except OciworkerError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.HistoryListResponse(
            records_json=[json.dumps(r.to_json()).encode() for r in records]
        )

    async def InspectHistory(
        self, request: pb.HistoryRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HistoryRecordResponse:
        try:
            record = self._history().get(request.ref)
        except OciworkerError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.HistoryRecordResponse(record_json=json.dumps(record.to_json()).encode())

    async def HistoryLogs(
        self, request: pb.HistoryRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HistoryLogsResponse:
        try:
            events = self._history().events(request.ref)
        except OciworkerError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.HistoryLogsResponse(events_json=json.dumps(events).encode())

    async def RemoveHistory(
        self, request: pb.HistoryRemoveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HistoryRemoveResponse:
        try:
            history = self._history()
            gone = history.remove(history.ids() if request.all else list(request.refs))
        except OciworkerError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.HistoryRemoveResponse(ids=gone)

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListWorkersResponse:
        cfg = self.worker.config
        return pb.ListWorkersResponse(
            workers=[
                pb.WorkerRecord(
                    id=socket.gethostname(),
                    platforms=[str(cfg.platform)],
                    labels={
                        "org.mobyproject.buildkit.worker.executor": cfg.runtime,
                        "org.mobyproject.buildkit.worker.snapshotter": cfg.snapshotter,
                        "org.mobyproject.buildkit.worker.hostname": socket.gethostname(),
                    },
                )
            ]
        )

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InfoResponse:
        cfg = self.worker.config
        return pb.InfoResponse(
            version=__version__,
            root=str(self.worker.root),
            runtime=cfg.runtime,
            snapshotter=cfg.snapshotter,
            running_builds=sum(1 for b in self._builds.values() if not b.done),
            rootless=rootless(),
            snapshotter_picked=getattr(self.worker.snapshots, "picked", ""),
        )

    async def CheckBases(
        self, request: pb.CheckBasesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CheckBasesResponse:
        """``build --check`` over the daemon: the worker resolves the base images
        (its image store, then the registry with the session's credentials), so
        the client's rules see what an embedded check sees."""
        try:
            session = self.sessions.get(request.session_id) if request.session_id else None
            refs = [controller.BaseRef(r.name, r.platform) for r in request.refs]
            bases = await controller.check_bases(self.worker, refs, session, pull=request.pull)
        except OciworkerError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.CheckBasesResponse(
            images=[
                pb.CheckBaseImage(env=b.env, platform=b.platform, layers=b.layers)
                for b in (bases[r] for r in refs)
            ]
        )

    # -- Session -------------------------------------------------------------------------

    async def Session(
        self,
        request_iterator: Any,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await serve_session(self.sessions, context)


async def serve_session(hub: SessionHub, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """The worker's side of one Session call: register, then route both ways."""
    first = await context.read()
    if isinstance(first, Malformed):
        await _abort(context, UserError(str(first)))
        return
    if not isinstance(first, pb.SessionMessage) or first.WhichOneof("msg") != "hello":
        await _abort(context, UserError("a session starts with a hello"))
        return
    out: asyncio.Queue[pb.SessionMessage | None] = asyncio.Queue()
    session = WorkerSession(first.hello, out.put_nowait)
    try:
        hub.add(session)
    except UserError as exc:
        await _abort(context, exc)
        return
    # the echo tells the client the session is registered: a Solve may follow
    await context.write(pb.SessionMessage(hello=first.hello))

    bad: list[Malformed] = []

    async def read_loop() -> None:
        try:
            while isinstance(msg := await context.read(), pb.SessionMessage):
                session.dispatch(msg)
            if isinstance(msg, Malformed):
                bad.append(msg)
        finally:
            out.put_nowait(None)

    reader = asyncio.create_task(read_loop())
    try:
        while (msg := await out.get()) is not None:
            await context.write(msg)
    finally:
        hub.remove(session)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    if bad:
        await _abort(context, UserError(str(bad[0])))


def _output_text(o: pb.Output) -> str:
    for k, v in [("type", o.type), *o.attrs.items()]:
        if "," in k + v or "=" in k:
            raise ConfigError(f"invalid output attribute {k}={v!r}")
    return ",".join(f"{k}={v}" for k, v in [("type", o.type), *sorted(o.attrs.items())])


def _result_of(task: asyncio.Task[pb.SolveResult]) -> pb.SolveResult | None:
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _error_of(task: asyncio.Task[Any]) -> OciworkerError | None:
    if task.cancelled():
        return BuildCancelled("build cancelled")
    exc = task.exception()
    if exc is None:
        return None
    if isinstance(exc, OciworkerError):
        return exc
    return OciworkerError(f"internal error: {type(exc).__name__}: {exc}")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: OciworkerError) -> None:
    context.set_trailing_metadata(api_errors.trailing_metadata(exc))
    context.set_code(api_errors.status_code(exc))
    context.set_details(str(exc))


class Malformed:
    """What a request that is no valid protobuf deserializes to: the handler then
    refuses it with INVALID_ARGUMENT (grpc.aio would answer UNKNOWN with the
    Python exception's class name, as if the daemon had failed)."""

    def __init__(self, error: str) -> None:
        self.error = error

    def __str__(self) -> str:
        return f"malformed request (not a valid protobuf message): {self.error}"


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Malformed(str(exc))

    return deserialize


def _refusing(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            await _abort(context, UserError(str(request)))
            return None
        return await behavior(request, context)

    return call


class _Collect:
    """Stands in for the server while the generated code registers its handlers."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service = service
        self.handlers = handlers


def add_to_server(service: ControlService, server: grpc.aio.Server) -> None:
    collect = _Collect()
    pb_grpc.add_ControlServicer_to_server(
        cast(pb_grpc.ControlServicer, service), cast(grpc.aio.Server, collect)
    )
    handlers: dict[str, Any] = {}
    for name, h in collect.handlers.items():
        # a grpc method handler is a namedtuple: _replace keeps everything else
        fixed = h._replace(request_deserializer=_tolerant(h.request_deserializer))
        if h.unary_unary is not None:
            fixed = fixed._replace(unary_unary=_refusing(h.unary_unary))
        elif h.unary_stream is not None:
            fixed = fixed._replace(unary_stream=_refusing(h.unary_stream))
        # the stream-stream Session checks each message it reads (serve_session)
        handlers[name] = fixed
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(collect.service, handlers),)
    )
    server.add_registered_method_handlers(collect.service, handlers)


def unix_socket_path(addr: str) -> Path | None:
    return Path(addr.removeprefix("unix://")) if addr.startswith("unix://") else None
