"""``ociworker.Client``: run builds, du, prune and info on a daemon.

A build opens a session first (the client serves its context, secrets, ssh
agents and registry credentials on it), then a ``Solve`` naming that session.
Outputs are written here, on the client, from the bytes in the Solve stream.

    async with ociworker.Client("unix:///run/ociworker/ociworker.sock") as c:
        result = await c.build("ctx", tags=("app:dev",), outputs=("type=oci,dest=app.tar",))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import grpc

from ociworker.api import errors as api_errors
from ociworker.api.convert import event_from_proto, usage_record_from_proto
from ociworker.api.session import ClientSession
from ociworker.api.v1 import control_pb2 as pb
from ociworker.api.v1 import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from ociworker.controller import BaseImage, BaseRef
from ociworker.core.build import (
    BuildDefinition,
    BuildRequest,
    BuildResult,
    UsageRecord,
    check_platforms,
)
from ociworker.core.definition import MAX_BYTES as MAX_DEFINITION_BYTES
from ociworker.core.definition import DefinitionError
from ociworker.core.digest import Digest
from ociworker.core.history import BuildRecord
from ociworker.core.oci import Descriptor, Platform
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import Event, EventSink, LayerCommitted, discard
from ociworker.core.session import Credentials, Secrets, SSHAgents
from ociworker.errors import (
    BuildCancelled,
    ConfigError,
    DaemonUnavailable,
    UnsupportedError,
    WorkerRefused,
)
from ociworker.fs.atomic import write_atomic
from ociworker.fs.ignore import IgnoreMatcher, read_dir_ignore
from ociworker.fs.oserror import os_error_text
from ociworker.session.context import (
    STDIN,
    read_definition,
    read_ignore_file,
    read_stdin_dockerfile,
)

DEFAULT_ADDR = "unix:///run/ociworker/ociworker.sock"

#: a dead peer is noticed within keepalive_time + keepalive_timeout (10 s)
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC core waits this long for any ping's ack (default 1 min); without it
    # the keepalive timeout above is not what ends a dead connection
    ("grpc.http2.ping_timeout_ms", 5000),
)


@dataclass(frozen=True)
class OutputData:
    """Bytes of output ``index`` of the request (the last chunk has ``eof``)."""

    index: int
    data: bytes
    eof: bool


@dataclass(frozen=True)
class LayerData:
    """Part of a committed step's layer for ``type=layers`` output ``index``
    (``layer_json``, the ``LayerCommitted`` JSON, on the first part only)."""

    index: int
    digest: str
    layer_json: bytes
    data: bytes
    eof: bool


@dataclass(frozen=True)
class DaemonInfo:
    version: str
    root: str
    runtime: str
    snapshotter: str
    running_builds: int
    rootless: bool = False
    snapshotter_picked: str = ""


SolveItem = Event | OutputData | LayerData | BuildResult


def session_key(context: Path, dockerfile_name: str) -> str:
    """The key under which the daemon keeps this context's last synced copy (as
    buildx's shared key: this host, this context dir, this Dockerfile)."""
    raw = f"{socket.gethostname()}:{context.resolve()}:{dockerfile_name}"
    return hashlib.sha256(raw.encode()).hexdigest()


def _read_pem(flag: str, path: str) -> bytes:
    # gRPC's C core would only log "Invalid cert chain file" lines and fail the
    # connection later; a file that is no PEM is the flag's fault, said now.
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {os_error_text(exc)}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag} {path}: not a PEM file")
    return data


def check_addr(addr: str) -> None:
    """Refuse an address no channel can be opened to, before anything connects."""
    if not addr.startswith(("unix://", "tcp://")):
        raise ConfigError(f"invalid daemon address {addr!r}: use unix:///PATH or tcp://HOST:PORT")


def _open_channel(
    addr: str, tlscacert: str | None, tlscert: str | None, tlskey: str | None
) -> grpc.aio.Channel:
    check_addr(addr)
    options = list(KEEPALIVE_OPTIONS)
    if addr.startswith("unix://"):
        return grpc.aio.insecure_channel(addr, options=options)
    target = addr.removeprefix("tcp://")
    if not (tlscacert and tlscert and tlskey):
        raise ConfigError(f"{addr}: TCP needs mutual TLS: give --tlscacert, --tlscert and --tlskey")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read_pem("--tlscacert", tlscacert),
        private_key=_read_pem("--tlskey", tlskey),
        certificate_chain=_read_pem("--tlscert", tlscert),
    )
    return grpc.aio.secure_channel(target, creds, options=options)


class Client:
    def __init__(
        self,
        addr: str | None = None,
        *,
        tlscacert: str | None = None,
        tlscert: str | None = None,
        tlskey: str | None = None,
    ) -> None:
        self.addr = addr or os.environ.get("OCIWORKER_HOST") or DEFAULT_ADDR
        self._channel = _open_channel(self.addr, tlscacert, tlscert, tlskey)
        self._stub = pb_grpc.ControlStub(self._channel)

    async def aclose(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- unary calls ---------------------------------------------------------------

    def _error(self, err: grpc.aio.AioRpcError) -> BaseException:
        exc = api_errors.from_rpc_error(err)
        if isinstance(exc, WorkerRefused):
            return WorkerRefused(f"the ociworker daemon at {self.addr} refused the build: {exc}")
        if isinstance(exc, DaemonUnavailable):
            # gRPC's text ("failed to connect to all addresses; last error: ...")
            # names neither the flag nor the cause in words: say both.
            cause = (err.details() or "").rsplit(": ", 1)[-1].strip()
            cause = cause[:1].lower() + cause[1:] if cause else "no answer"
            return DaemonUnavailable(f"cannot reach the ociworker daemon at {self.addr}: {cause}")
        return exc

    async def info(self, *, timeout: float | None = None) -> DaemonInfo:
        """The daemon's version and state; with ``timeout`` (seconds) a daemon
        that does not answer in time is ``DaemonUnavailable`` (the fleet's probe)."""
        r = await self._unary(self._stub.Info, pb.InfoRequest(), timeout=timeout)
        return DaemonInfo(
            r.version,
            r.root,
            r.runtime,
            r.snapshotter,
            r.running_builds,
            r.rootless,
            r.snapshotter_picked,
        )

    async def disk_usage(self) -> list[UsageRecord]:
        r = await self._unary(self._stub.DiskUsage, pb.DiskUsageRequest())
        return [usage_record_from_proto(x) for x in r.records]

    async def prune(
        self,
        *,
        all: bool = False,
        filters: Sequence[str] = (),
        keep_storage: int = 0,
        keep_duration: float = 0.0,
    ) -> list[UsageRecord]:
        """Prune on the daemon (buildx's flags); the records it removed, each
        with the bytes it freed."""
        request = pb.PruneRequest(
            all=all, filters=filters, keep_storage=keep_storage, keep_duration=keep_duration
        )
        r = await self._unary(self._stub.Prune, request)
        return [usage_record_from_proto(x) for x in r.records]

    # -- build history ---------------------------------------------------------------

    async def history_records(self) -> list[BuildRecord]:
        r = await self._unary(self._stub.ListHistory, pb.HistoryListRequest())
        return [BuildRecord.from_json(json.loads(x)) for x in r.records_json]

    async def history_get(self, ref: str) -> BuildRecord:
        r = await self._unary(self._stub.InspectHistory, pb.HistoryRef(ref=ref))
        return BuildRecord.from_json(json.loads(r.record_json))

    async def history_events(self, ref: str) -> list[dict[str, Any]]:
        r = await self._unary(self._stub.HistoryLogs, pb.HistoryRef(ref=ref))
        got: list[dict[str, Any]] = json.loads(r.events_json)
        return got

    async def history_remove(self, refs: Sequence[str], *, all: bool = False) -> list[str]:
        req = pb.HistoryRemoveRequest(refs=list(refs), all=all)
        r = await self._unary(self._stub.RemoveHistory, req)
        return list(r.ids)

    async def list_workers(self) -> list[dict[str, Any]]:
        r = await self._unary(self._stub.ListWorkers, pb.ListWorkersRequest())
        return [
            {"id": w.id, "platforms": list(w.platforms), "labels": dict(w.labels)}
            for w in r.workers
        ]

    async def check_bases(
        self,
        refs: Sequence[BaseRef],
        *,
        pull: bool = False,
        credentials: Credentials | None = None,
    ) -> dict[BaseRef, BaseImage]:
        """``build --check``'s base images, resolved by the daemon; registry
        credentials are served from here through a session, as for a build."""
        from ociworker.controller import BaseImage

        session = ClientSession(uuid.uuid4().hex, {}, credentials=credentials)
        request = pb.CheckBasesRequest(
            refs=[pb.CheckBaseRef(name=r.name, platform=r.platform) for r in refs],
            pull=pull,
            session_id=session.id,
        )
        async with self._session(session):
            r = await self._unary(self._stub.CheckBases, request)
        return {
            ref: BaseImage(env=tuple(b.env), platform=b.platform, layers=b.layers)
            for ref, b in zip(refs, r.images, strict=True)
        }

    async def _unary(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None

    # -- builds ----------------------------------------------------------------------

    async def solve(
        self,
        request: BuildRequest,
        *,
        build_id: str | None = None,
        secrets: Secrets | None = None,
        secret_ids: Sequence[str] = (),
        ssh: SSHAgents | None = None,
        ssh_ids: Sequence[str] = (),
        credentials: Credentials | None = None,
        failover: bool = False,
        accepted: Callable[[], None] | None = None,
        definition: BuildDefinition | bytes | None = None,
    ) -> AsyncIterator[SolveItem]:
        """Run a build; yields its progress events, output and layer bytes, and
        last the ``BuildResult``. Leaving the loop early cancels the build.

        With ``failover``, a failure that proves the daemon did not take the
        build raises ``WorkerRefused`` (see ``_not_taken``): the caller may
        hand the same build to another daemon without it ever running twice.
        ``accepted`` is called when the daemon first answers the Solve: from
        then on the build is that daemon's. ``definition`` is the Dockerfile
        already read (once per build: ``-f -`` cannot be read twice), or
        the bytes of a definition for ``request.frontend`` (graph.v1: what
        ``ociworker.definition.encode`` wrote).
        """
        if isinstance(definition, bytes):
            if request.frontend in ("", "dockerfile", "dockerfile.v0"):
                raise ConfigError(
                    "definition bytes are for another frontend than the Dockerfile's: "
                    'pass frontend="graph.v1" (or a plugin\'s name)'
                )
            # the context's .dockerignore holds for a graph's context as for a
            # Dockerfile's: what it names is never sent
            ignore = () if request.context_url else read_ignore_file(request.context, None)
            definition = BuildDefinition("", "definition", ignore, source=definition)
        if definition is not None and len(definition.source) > MAX_DEFINITION_BYTES:
            raise DefinitionError(
                f"definition of {len(definition.source)} bytes is over the limit of "
                f"{MAX_DEFINITION_BYTES} bytes"
            )
        remote = request.context_url
        if remote and definition is None:
            # The worker fetches the context and reads the Dockerfile in it,
            # unless it comes from stdin here (-f -).
            definition = (
                BuildDefinition(read_stdin_dockerfile(), "Dockerfile")
                if request.dockerfile == STDIN
                else BuildDefinition("", str(request.dockerfile or ""))
            )
        elif definition is None:
            definition = read_definition(request.context, request.dockerfile)
        ctx = request.context.absolute()
        if request.platforms:
            workers = await self.list_workers()
            own = Platform.parse(workers[0]["platforms"][0]) if workers else Platform()
            check_platforms(request.platforms, own)
        dirs: dict[str, tuple[Path, IgnoreMatcher | None]] = {
            "context": (ctx, IgnoreMatcher(definition.ignore_patterns))
        }
        contexts: dict[str, str] = {}
        for nc in request.build_contexts:
            if nc.kind == "oci-layout":
                # the daemon must not read a path the client names on its host
                raise UnsupportedError(
                    f"--build-context {nc.name}={nc.raw}: oci-layout contexts are not "
                    "supported on a daemon yet (build without --addr)"
                )
            if nc.kind == "local":
                # its own .dockerignore, applied here: ignored files are never sent
                root = Path(nc.value).absolute()
                dirs[nc.local_name] = (root, read_dir_ignore(root))
                contexts[nc.name] = "local:" + nc.local_name
            else:
                contexts[nc.name] = nc.raw
        if remote:
            del dirs["context"]  # the worker fetches it; named dirs still go
        session = ClientSession(
            uuid.uuid4().hex,
            dirs,
            secrets=secrets,
            secret_ids=secret_ids,
            ssh=ssh,
            ssh_ids=ssh_ids,
            credentials=credentials,
        )
        solve_req = pb.SolveRequest(
            build_id=build_id or uuid.uuid4().hex,
            session_id=session.id,
            dockerfile_name=definition.filename,
            dockerfile=definition.dockerfile.encode(),
            ignore_patterns=definition.ignore_patterns,
            tags=request.tags,
            build_args=dict(request.build_args),
            target=request.target,
            outputs=[pb.Output(type=o.type, attrs=dict(o.attrs)) for o in request.outputs],
            no_cache=request.no_cache,
            network=request.network,
            ulimits=[str(u) for u in request.ulimits],
            shm_size=request.shm_size or 0,
            want_metadata=(
                request.want_image
                or request.iidfile is not None
                or request.metadata_file is not None
            ),
            context_key="" if remote else session_key(ctx, definition.filename),
            context_url=remote,
            allow=request.allow,
            extra_hosts=[f"{name}={ip}" for name, ip in request.extra_hosts],
            cache_to=[str(s) for s in request.cache_to],
            cache_from=[str(s) for s in request.cache_from],
            annotations=request.annotations,
            labels=dict(request.labels),
            build_contexts=contexts,
            explain_cache=request.explain_cache,
            verify_cache=request.verify_cache,
            pull=request.pull,
            no_cache_filter=request.no_cache_filter,
            definition=definition.source,
            frontend=request.frontend,
            frontend_opts=dict(request.frontend_opts),
        )
        solve_sent = answered = False
        try:
            async with self._session(session):
                solve_sent = True
                call = self._stub.Solve(solve_req)
                try:
                    async for msg in call:
                        if not answered:
                            answered = True
                            if accepted is not None:
                                accepted()
                        item = _item(msg)
                        if item is not None:
                            yield item
                finally:
                    call.cancel()
        except grpc.aio.AioRpcError as err:
            exc = self._error(err)
            if failover and not answered:
                why = _not_taken(err, solve_sent=solve_sent)
                if why is not None:
                    raise WorkerRefused(f"{self.addr}: {why}") from None
            raise exc from None

    async def status(self, build_id: str) -> AsyncIterator[SolveItem]:
        """Attach to a build by id: what happened so far, then until it ends."""
        call = self._stub.Status(pb.StatusRequest(build_id=build_id))
        try:
            async for msg in call:
                item = _item(msg)
                if item is not None:
                    yield item
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()

    @contextlib.asynccontextmanager
    async def _session(self, session: ClientSession) -> AsyncIterator[None]:
        call = self._stub.Session()
        await call.write(session.hello())
        ack = await call.read()  # the daemon registered the session
        if not isinstance(ack, pb.SessionMessage):
            await call.code()  # raises the daemon's error when it refused
            raise ConfigError("the daemon closed the session")
        task = asyncio.create_task(session.serve(call, grpc.aio.EOF))
        try:
            yield
        finally:
            task.cancel()
            call.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def build(
        self,
        request: BuildRequest | Path | str,
        *,
        events: EventSink = discard,
        build_id: str | None = None,
        secrets: Secrets | None = None,
        secret_ids: Sequence[str] = (),
        ssh: SSHAgents | None = None,
        ssh_ids: Sequence[str] = (),
        credentials: Credentials | None = None,
        failover: bool = False,
        accepted: Callable[[], None] | None = None,
        definition: BuildDefinition | bytes | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> BuildResult:
        """Run a build and write its outputs, iidfile and metadata file here.

        ``request`` is a ``BuildRequest`` or a context dir with the request's
        other fields as keywords (``outputs`` may be strings as ``--output``).
        ``failover``, ``accepted`` and ``definition`` are ``solve``'s;
        ``extra_metadata`` is added to the result's metadata (and file): the
        fleet records its pick there.
        """
        request = as_request(request, fields)
        writers = _OutputWriters(request.outputs)
        result: BuildResult | None = None
        try:
            async for item in self.solve(
                request,
                build_id=build_id,
                secrets=secrets,
                secret_ids=secret_ids,
                ssh=ssh,
                ssh_ids=ssh_ids,
                credentials=credentials,
                failover=failover,
                accepted=accepted,
                definition=definition,
            ):
                if isinstance(item, OutputData):
                    await asyncio.to_thread(writers.write, item)
                elif isinstance(item, LayerData):
                    await asyncio.to_thread(writers.layer, item)
                elif isinstance(item, BuildResult):
                    result = item
                else:
                    events(item)
        finally:
            writers.close()
        if result is None:
            raise ConfigError("the daemon ended the build without a result")
        if extra_metadata:
            result = replace(result, metadata={**result.metadata, **extra_metadata})
        meta = result.metadata
        from ociworker.exporter.target import write_errors

        if request.iidfile is not None and result.config_digest:
            with write_errors(f"cannot write --iidfile {request.iidfile}"):
                write_atomic(request.iidfile, result.config_digest.encode())
        if request.metadata_file is not None:
            with write_errors(f"cannot write --metadata-file {request.metadata_file}"):
                write_atomic(request.metadata_file, json.dumps(meta, indent=2).encode() + b"\n")
        return result


def as_request(request: BuildRequest | Path | str, fields: dict[str, Any]) -> BuildRequest:
    """``Client.build``'s ``request`` and keywords as one ``BuildRequest``."""
    if not isinstance(request, BuildRequest):
        outs = tuple(
            o if isinstance(o, OutputSpec) else OutputSpec.parse(o)
            for o in fields.pop("outputs", ())
        )
        return BuildRequest(context=Path(request), outputs=outs, **fields)
    return replace(request, **fields) if fields else request


def _not_taken(err: grpc.aio.AioRpcError, *, solve_sent: bool) -> str | None:
    """Why the daemon did not take the build, when a failure before its first
    answer proves it did not; ``None`` when it may have (then no failover).

    Proof is: no Solve was sent yet (the session could not be opened), the
    daemon refused the Solve in words (``WorkerRefused``, or RESOURCE_EXHAUSTED,
    gRPC's "too busy"; a daemon's first answer is a small progress event, so
    this is no answer that was too large), or the channel never connected, so
    the Solve never left this process. A Solve
    that was sent on a live connection and then lost it (UNAVAILABLE, reset)
    may be running there: it is reported, not retried elsewhere.
    """
    code = err.code()
    details = err.details() or str(code)
    if isinstance(api_errors.from_rpc_error(err), WorkerRefused):
        return f"refused: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"refused: {details}"
    if code == grpc.StatusCode.UNAVAILABLE and (
        not solve_sent or "failed to connect to all addresses" in details
    ):
        return f"unavailable: {details}"
    return None


def _item(msg: pb.SolveEvent) -> SolveItem | None:
    ev = event_from_proto(msg)
    if ev is not None:
        return ev
    which = msg.WhichOneof("event")
    if which == "output":
        o = msg.output
        return OutputData(o.output, o.data, o.eof)
    if which == "layer":
        la = msg.layer
        return LayerData(la.output, la.digest, la.layer_json, la.data, la.eof)
    if which == "result":
        r = msg.result
        meta = json.loads(r.metadata_json or b"{}")
        desc = meta.get("containerimage.descriptor")
        return BuildResult(
            manifest=Descriptor.from_json(desc) if desc else None,
            config_digest=Digest(r.config_digest) if r.config_digest else None,
            metadata=meta,
        )
    return None


class _OutputWriters:
    """Writes the outputs on the client, from the stream, with the functions the
    embedded worker's ``LocalExportTarget`` uses: archives appear whole or not
    at all, ``local`` trees are unpacked path-safely, a layer's descriptor only
    after its whole, verified blob."""

    def __init__(self, outputs: Sequence[OutputSpec]) -> None:
        self.outputs = list(outputs)
        self._open: dict[int, tuple[contextlib.ExitStack, IO[bytes]]] = {}
        self._layers: dict[tuple[int, str], tuple[IO[bytes], bytes]] = {}

    def _out(self, index: int) -> OutputSpec:
        if not 0 <= index < len(self.outputs):
            raise ConfigError(f"daemon sent output {index}, which was not asked for")
        return self.outputs[index]

    def write(self, item: OutputData) -> None:
        from ociworker.exporter.target import open_archive_dest, output_errors

        out = self._out(item.index)
        got = self._open.get(item.index)
        if got is None:
            stack = contextlib.ExitStack()
            stack.enter_context(output_errors(out))
            try:
                if out.type == "local":
                    # the tree arrives as a tar; unpacked at eof
                    f: IO[bytes] = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
                else:
                    f = stack.enter_context(open_archive_dest(out.get("dest")))
            except BaseException:
                with stack:  # an OSError leaves as our error
                    raise
            got = self._open[item.index] = (stack, f)
        stack, f = got
        try:
            f.write(item.data)
        except BaseException:
            # A write that fails (a full disk) ends this output now: the temp
            # file goes and the OSError leaves as our error, not a traceback.
            del self._open[item.index]
            with stack:
                raise
        if not item.eof:
            return
        del self._open[item.index]
        with stack:
            if out.type == "local":
                from ociworker.exporter.target import write_local_tar

                f.seek(0)
                write_local_tar(cast(BinaryIO, f), Path(out.get("dest")))

    def layer(self, item: LayerData) -> None:
        from ociworker.exporter.target import output_errors, write_layer

        out = self._out(item.index)
        key = (item.index, item.digest)
        got = self._layers.get(key)
        with output_errors(out):  # a full disk is our error, not a traceback
            if got is None:
                tmp = tempfile.TemporaryFile()  # noqa: SIM115 (closed at eof or in close())
                got = self._layers[key] = (tmp, item.layer_json)
            f, head = got
            f.write(item.data)
        if not item.eof:
            return
        del self._layers[key]
        with f, output_errors(out):
            f.seek(0)
            layer = LayerCommitted.from_json(json.loads(head))
            write_layer(Path(out.get("dest")), layer, cast(BinaryIO, f))

    def close(self) -> None:
        """Drop what did not arrive whole (the build failed or was cancelled)."""
        for stack, _ in self._open.values():
            with contextlib.suppress(BaseException):
                stack.__exit__(BuildCancelled, BuildCancelled("output incomplete"), None)
        self._open.clear()
        for f, _ in self._layers.values():
            f.close()
        self._layers.clear()
