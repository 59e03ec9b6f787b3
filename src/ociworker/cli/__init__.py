"""Command line: the composition root (flags -> config -> worker -> controller)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ociworker import log
from ociworker.cli.failures import Phase, UsageError, describe
from ociworker.core.build import (
    BuildDefinition,
    BuildRequest,
    NamedContext,
    PruneFilter,
    Ulimit,
    UsageRecord,
    parse_add_host,
    parse_duration,
    parse_ram_size,
    step_limits,
)
from ociworker.core.cacheimport import parse_cache_specs
from ociworker.core.entitlements import parse_entitlements
from ociworker.core.gc import GCConfig, gc_config
from ociworker.core.gitref import redact
from ociworker.core.outputs import OutputSpec, parse_annotations, parse_labels, with_push
from ociworker.core.progress import Event, EventSink
from ociworker.core.session import NoSSH, SSHAgents
from ociworker.core.units import human_size, parse_size
from ociworker.errors import ConfigError, NotFoundError, OciworkerError
from ociworker.fs.userns import default_root
from ociworker.progress_ui import PROGRESS_MODES, PlainPrinter, QuietPrinter, RawJSONPrinter
from ociworker.session.credentials import DockerConfigCredentials
from ociworker.version import __version__

if TYPE_CHECKING:  # grpc loads only when a command talks to a daemon
    from ociworker.api.client import Client
    from ociworker.api.daemon import DaemonConfig
    from ociworker.worker import Worker

_log = log.get_logger("ociworker.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ours to report: buildx exits 1, not 2, and
    prints one ``ERROR:`` line, not argparse's usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


class _State:
    """What main() needs to know when the command ends: how far it got and which
    signal (if any) stopped it."""

    phase = Phase.SETUP
    signum: int | None = None
    root: Path | None = None


_state = _State()


SNAPSHOTTERS = ("auto", "overlayfs", "fuse-overlayfs", "native")


def _worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        type=Path,
        default=default_root(),
        help="state directory (default $OCIWORKER_ROOT, else /var/lib/ociworker for root "
        "and $XDG_DATA_HOME/ociworker for a user)",
    )
    p.add_argument(
        "--runtime",
        default=None,
        help="OCI runtime: runc, crun or a PATH (default crun when installed, else runc)",
    )
    p.add_argument("--snapshotter", choices=SNAPSHOTTERS, default="auto")
    p.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST",
        help="use plain HTTP for this registry (localhost and 127.0.0.0/8 always are)",
    )
    p.add_argument("--max-parallelism", type=int, default=None, metavar="N")
    _client_flags(p)


def _client_flags(p: argparse.ArgumentParser) -> None:
    # With an address (or $OCIWORKER_HOST) the command runs on that daemon;
    # without, on the embedded worker. Repeated (build only): a fleet, see
    # _resolve_addrs. The environment is read there, not as the default: an
    # appended list would otherwise grow from it.
    p.add_argument(
        "--addr",
        action="append",
        default=None,
        help="daemon address unix:///PATH or tcp://HOST:PORT (default $OCIWORKER_HOST); "
        "build: repeat for a fleet, the worker is picked by the context",
    )
    p.add_argument("--tlscacert", default=None, help="CA certificate of the daemon (tcp://)")
    p.add_argument("--tlscert", default=None, help="client certificate (tcp://)")
    p.add_argument("--tlskey", default=None, help="client key (tcp://)")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    # Defaults are None so the config file's values count unless a flag is given.
    p.add_argument(
        "--addr",
        default=None,
        help="unix:///PATH (default), tcp://HOST:PORT or fd://[N|NAME] (systemd socket activation)",
    )
    p.add_argument("--root", type=Path, default=None, help="state directory")
    p.add_argument("--config", type=Path, default=None, help="TOML config file")
    p.add_argument("--group", default=None, help="group owning the unix socket (mode 0660)")
    p.add_argument("--tlscacert", default=None, help="CA that signs client certificates")
    p.add_argument("--tlscert", default=None, help="server certificate")
    p.add_argument("--tlskey", default=None, help="server key")
    p.add_argument(
        "--runtime",
        default=None,
        help="OCI runtime: runc, crun or a PATH (default crun when installed, else runc)",
    )
    p.add_argument("--snapshotter", choices=SNAPSHOTTERS, default=None)
    p.add_argument("--insecure-registry", action="append", default=None, metavar="HOST")
    p.add_argument("--max-parallelism", type=int, default=None, metavar="N")
    p.add_argument("--log-cap", default=None, help="per-step log cap (bytes or e.g. 2MiB)")
    _step_limit_flags(p)


def _step_limit_flags(p: argparse.ArgumentParser) -> None:
    # The worker's limits of every RUN step (config keys step_memory, step_pids, step_cpus).
    p.add_argument("--step-memory", default=None, metavar="SIZE", help="e.g. 2g (no limit)")
    p.add_argument("--step-pids", type=int, default=None, metavar="N", help="(default 16384)")
    p.add_argument("--step-cpus", type=float, default=None, metavar="N", help="e.g. 1.5")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ociworker", description="A BuildKit-class container image builder.")
    parser.add_argument("--version", action="version", version=f"ociworker {__version__}")
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console",
        help="diagnostic log format on stderr (json also logs each build's summary)",
    )
    parser.add_argument("--debug", action="store_true", help="debug logs on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="build an image from a Dockerfile")
    b.add_argument(
        "context",
        help="build context: a directory, a git URL (URL#REF:SUBDIR), an http(s) "
        "tarball URL, or - (a tar or a Dockerfile on stdin)",
    )
    b.add_argument(
        "-f",
        "--file",
        type=Path,
        default=None,
        help="Dockerfile (default CONTEXT/Dockerfile; - reads it from stdin)",
    )
    b.add_argument("-t", "--tag", action="append", default=[], help="name:tag for the image")
    b.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--target", default="", help="stage to build")
    b.add_argument(
        "-o",
        "--output",
        action="append",
        default=[],
        help="type=oci|docker|tar|local|image|layers[,dest=PATH|-][,compression=gzip|zstd]...",
    )
    b.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default=None,
        help="auto (tty on a terminal, else plain), plain, tty, quiet, rawjson "
        "(default $BUILDKIT_PROGRESS or auto)",
    )
    b.add_argument("--no-cache", action="store_true", help="do not use the build cache")
    b.add_argument(
        "--cache-to",
        action="append",
        default=[],
        metavar="type=registry,ref=REF|type=local,dest=DIR|type=inline[,mode=min|max]",
        help="export the build cache (repeatable)",
    )
    b.add_argument(
        "--cache-from",
        action="append",
        default=[],
        metavar="type=registry,ref=REF|type=local,src=DIR|IMAGE",
        help="import a build cache (repeatable, tried in order)",
    )
    b.add_argument("--network", choices=("default", "none", "host"), default="default")
    b.add_argument("--add-host", action="append", default=[], metavar="NAME:IP")
    b.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="network.host|security.insecure",
        help="entitlement the build asks for (repeatable; the worker must grant it too)",
    )
    b.add_argument("--iidfile", type=Path, default=None, help="write the image ID here")
    b.add_argument("--metadata-file", type=Path, default=None, help="write build metadata here")
    b.add_argument("-q", "--quiet", action="store_true", help="print the image ID only")
    b.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="id=ID,src=FILE|env=VAR",
        help="secret for RUN --mount=type=secret (repeatable)",
    )
    b.add_argument(
        "--ssh",
        action="append",
        default=[],
        metavar="default|ID[=SOCKET|KEY[,KEY]]",
        help="ssh agent or keys for RUN --mount=type=ssh (repeatable)",
    )
    b.add_argument(
        "--push",
        action="store_true",
        help="push the image to its registry (shorthand for --output type=registry)",
    )
    b.add_argument(
        "--annotation",
        action="append",
        default=[],
        metavar="[manifest:]KEY=VALUE",
        help="annotation of the image manifest (repeatable)",
    )
    b.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="image label (repeatable)"
    )
    b.add_argument(
        "--registry-ca",
        action="append",
        default=[],
        metavar="HOST=FILE",
        help="trust this CA certificate (PEM) for the registry HOST[:PORT] (repeatable)",
    )
    b.add_argument(
        "--build-context",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="named context: DIR, docker-image://REF, oci-layout://PATH[:TAG|@DIGEST], URL",
    )
    b.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="PLATFORM",
        help="target platform (only the worker's own, e.g. linux/amd64)",
    )
    b.add_argument("--pull", action="store_true", help="always resolve images at the registry")
    b.add_argument(
        "--no-cache-filter",
        action="append",
        default=[],
        metavar="STAGE",
        help="do not use the cache for these stages (repeatable, comma-separated)",
    )
    b.add_argument(
        "--check", action="store_true", help="check the Dockerfile (lint rules), build nothing"
    )
    b.add_argument(
        "--explain-cache",
        action="store_true",
        help="after the build, say why each step that ran missed the cache",
    )
    b.add_argument(
        "--verify-cache",
        action="store_true",
        help="run every step again without the cache (in scratch) and fail on a false cache hit",
    )
    b.add_argument(
        "--frontend",
        default="dockerfile.v0",
        metavar="NAME",
        help="the frontend that reads the definition: dockerfile.v0 (alias dockerfile), "
        "graph.v1 (PATH is a serialized graph FILE, - reads stdin), or an installed plugin",
    )
    b.add_argument("--ulimit", action="append", default=[], metavar="NAME=SOFT[:HARD]")
    b.add_argument("--shm-size", default=None, metavar="SIZE", help="size of /dev/shm (64m)")
    _step_limit_flags(b)
    _worker_flags(b)
    b.add_argument(
        "--config",
        type=Path,
        default=None,
        help="worker config (TOML, as serve's): its [worker.oci] GC policies run after the build",
    )

    du = sub.add_parser("du", help="show build cache disk usage")
    du.add_argument("--verbose", "-v", action="store_true", help="every field of every record")
    du.add_argument(
        "--filter",
        action="append",
        default=[],
        help="type=T, id=ID, until=DURATION, description~=REGEX: show only those records",
    )
    _worker_flags(du)

    pr = sub.add_parser("prune", help="remove build cache")
    pr.add_argument(
        "--all", "-a", action="store_true", help="include internal/frontend records (git repos)"
    )
    pr.add_argument(
        "--filter",
        action="append",
        default=[],
        help="type=T, id=ID, until=DURATION, description~=REGEX: remove only those records",
    )
    pr.add_argument(
        "--keep-storage", default="0", metavar="SIZE", help="amount of disk space to keep for cache"
    )
    pr.add_argument(
        "--keep-duration", default="0", metavar="DURATION", help="keep data newer than this limit"
    )
    pr.add_argument("--verbose", "-v", action="store_true", help="every field of each removed")
    pr.add_argument("--force", "-f", action="store_true", help="do not ask (always true)")
    _worker_flags(pr)

    _history_parser(sub)

    sv = sub.add_parser("serve", help="run the worker daemon (gRPC)")
    _serve_flags(sv)

    # doctor's and info's modules load only when they run (info's pulls in grpc)
    _format_flag(sub.add_parser("doctor", help="check that this host and user can build"))

    inf = sub.add_parser("info", help="show what a running daemon says about itself")
    _format_flag(inf)
    _client_flags(inf)
    return parser


def _format_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("text", "json"), default="text")


def _history_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    h = sub.add_parser("history", help="work on build records (buildx history)")
    hs = h.add_subparsers(dest="history_command", required=True, parser_class=_Parser)
    ls = hs.add_parser("ls", help="list build records")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ins = hs.add_parser("inspect", help="inspect a build record")
    ins.add_argument("ref", nargs="?", default="", metavar="REF", help="ID, prefix or ^N")
    ins.add_argument("--format", choices=("pretty", "json"), default="pretty")
    lg = hs.add_parser("logs", help="print the logs of a build record (plain progress)")
    lg.add_argument("ref", nargs="?", default="", metavar="REF")
    lg.add_argument("--progress", choices=("plain", "rawjson"), default="plain")
    rm = hs.add_parser("rm", help="remove build records")
    rm.add_argument("refs", nargs="*", metavar="REF")
    rm.add_argument("--all", action="store_true", help="remove every record")
    tr = hs.add_parser("trace", help="the build as a timeline (SVG) or Chrome trace JSON")
    tr.add_argument("ref", nargs="?", default="", metavar="REF")
    tr.add_argument("--format", choices=("svg", "json"), default="svg")
    tr.add_argument("-o", "--output", type=Path, default=None, help="file (default stdout)")
    for p in (ls, ins, lg, rm, tr):
        _worker_flags(p)


def _build_args(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not k:
            raise ConfigError(f"invalid --build-arg {item!r}: want KEY=VALUE")
        if not eq:
            # Docker takes the value from the environment when only a name is given.
            if k in os.environ:
                out[k] = os.environ[k]
            continue
        out[k] = v
    # As buildx: the client's SOURCE_DATE_EPOCH travels as a build argument,
    # unless one is given (the daemon never reads its own environment for it).
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and "SOURCE_DATE_EPOCH" not in out:
        out["SOURCE_DATE_EPOCH"] = epoch
    return out


async def _check(args: argparse.Namespace, req: BuildRequest) -> int:
    """``build --check``: BuildKit's default lint rules over the Dockerfile,
    printed as buildx prints them; nothing is built. Exit 1 if any warns (buildx).
    The base images are resolved as a build resolves them (BuildKit's check
    does: UndefinedVar reads their variables, InvalidBaseImagePlatform their
    platform), by the worker that would build: the embedded one, or over
    ``--addr`` the daemon (for its platform and its image store)."""
    from ociworker.controller import check_base_refs, check_bases, check_dockerfile
    from ociworker.session.context import read_definition
    from ociworker.worker import host_platform

    definition = read_definition(req.context, req.dockerfile)
    if args.addr:
        async with _client(args) as client:
            workers = await client.list_workers()
            platform = workers[0]["platforms"][0] if workers else str(host_platform())
            refs = check_base_refs(definition, req, platform)
            bases = (
                await client.check_bases(refs, pull=req.pull, credentials=DockerConfigCredentials())
                if refs
                else {}
            )
        text, found = check_dockerfile(definition, req, bases, platform)
    else:
        platform = str(host_platform())
        refs = check_base_refs(definition, req, platform)
        if not refs:
            # nothing to resolve: no state dir is made
            text, found = check_dockerfile(definition, req, {}, platform)
        else:
            worker = _worker(args)
            try:
                bases = await check_bases(worker, refs, DockerConfigCredentials(), pull=req.pull)
                text, found = check_dockerfile(definition, req, bases, platform)
            finally:
                await worker.aclose()
    sys.stdout.write(text)
    sys.stdout.flush()
    return 1 if found else 0


def _build_contexts(items: Sequence[str]) -> tuple[NamedContext, ...]:
    """``--build-context``s; a name given twice is refused (buildx keeps one
    silently, which hides a typo), a DIR must be a directory."""
    out: dict[str, NamedContext] = {}
    for item in items:
        nc = NamedContext.parse(item)
        if nc.name in out:
            raise ConfigError(f"--build-context {nc.name} is given twice")
        if nc.kind == "local" and not Path(nc.value).is_dir():
            raise ConfigError(
                f"--build-context {item}: {nc.value} is not a directory "
                "(want DIR, docker-image://REF, oci-layout://PATH, a git URL or an HTTP(S) URL)"
            )
        out[nc.name] = nc
    return tuple(out.values())


def _check_tags(tags: Sequence[str]) -> None:
    # Before the build, as buildx: a bad name found after the solve wastes the build.
    from ociworker.core.reference import parse_reference
    from ociworker.errors import UserError

    for tag in tags:
        try:
            parse_reference(tag)
        except UserError as exc:
            raise ConfigError(f"invalid tag {tag!r}: {exc}") from None


def _registry_ca(items: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``--registry-ca HOST=FILE`` values, grouped by host; each file must exist."""
    out: dict[str, list[str]] = {}
    for item in items:
        host, eq, path = item.partition("=")
        if not eq or not host or not path or "/" in host:
            raise ConfigError(f"invalid --registry-ca {item!r}: want HOST[:PORT]=FILE")
        if not os.path.isfile(path):
            raise ConfigError(f"--registry-ca {item!r}: {path} is not a file")
        out.setdefault(host, []).append(os.path.abspath(path))
    return tuple((h, tuple(f)) for h, f in out.items())


def _worker(args: argparse.Namespace) -> Worker:
    # The worker (and the controller) load only for an embedded command: a
    # client of a daemon never needs them, and they are most of start-up.
    from ociworker.session.preflight import check_worker_root
    from ociworker.worker import WorkerConfig, default_runtime, open_worker

    check_worker_root(args.root)

    return open_worker(
        WorkerConfig(
            root=args.root,
            runtime=args.runtime or default_runtime(),
            snapshotter=args.snapshotter,
            insecure_registries=tuple(args.insecure_registry),
            registry_ca=_registry_ca(getattr(args, "registry_ca", ())),
            max_parallelism=args.max_parallelism,
            # entitlements: WorkerConfig's default grants both (the embedded
            # worker's operator is its user); a build must still ask with --allow.
            # du and prune run no step: they have no limit flags
            **step_limits(*(getattr(args, f"step_{k}", None) for k in ("memory", "pids", "cpus"))),
        )
    )


def _progress_mode(args: argparse.Namespace) -> str:
    """--progress, else $BUILDKIT_PROGRESS (as buildx), else auto; auto is tty
    when stderr is a terminal."""
    if args.quiet:
        return "quiet"
    mode: str = args.progress or os.environ.get("BUILDKIT_PROGRESS") or "auto"
    if mode not in PROGRESS_MODES:
        raise ConfigError(
            f"invalid progress mode {mode!r} (from BUILDKIT_PROGRESS): "
            f"use one of {', '.join(PROGRESS_MODES)}"
        )
    if mode == "auto":
        return "tty" if sys.stderr.isatty() else "plain"
    return mode


async def _cmd_build(args: argparse.Namespace) -> int:
    # What the context argument is decides what the build reads (as buildx):
    # - is stdin, an existing directory is local, a git or http(s) URL is
    # fetched by the worker.
    if args.frontend == "graph.v1":
        return await _build(args, *_graph_arg(args))
    with contextlib.ExitStack() as stack:
        context, context_url, dockerfile = _context_arg(args, stack)
        return await _build(args, context, context_url, dockerfile)


#: the largest graph definition read (``core.definition.MAX_BYTES``)
_MAX_GRAPH_BYTES = 64 << 20


def _graph_arg(args: argparse.Namespace) -> tuple[Path, str, Path | None, BuildDefinition]:
    """``--frontend graph.v1 FILE``: PATH is the definition (``-``: stdin), read
    here as bytes (protobuf is no text); the context its ``local://context``
    sources read is the definition's directory (stdin: the current one)."""
    from ociworker.session.context import read_ignore_file

    if args.file is not None:
        raise ConfigError("--frontend graph.v1 reads its definition from PATH (or -), not -f")
    text: str = args.context
    if text == "-":
        data, context, name = sys.stdin.buffer.read(_MAX_GRAPH_BYTES + 1), Path("."), "stdin"
    else:
        path = Path(text)
        try:
            with path.open("rb") as f:
                data = f.read(_MAX_GRAPH_BYTES + 1)
        except IsADirectoryError:
            raise ConfigError(
                f"--frontend graph.v1: {text} is a directory, want a definition file"
            ) from None
        except FileNotFoundError:
            raise NotFoundError(f"--frontend graph.v1: no definition file {text}") from None
        context, name = path.absolute().parent, path.name
    if not data.strip():
        raise ConfigError(f"--frontend graph.v1: the definition ({name}) is empty")
    ignore = read_ignore_file(context, None)
    return context, "", None, BuildDefinition("", name, ignore, source=data)


def _context_arg(
    args: argparse.Namespace, stack: contextlib.ExitStack
) -> tuple[Path, str, Path | None]:
    from ociworker.core.gitref import is_remote_context
    from ociworker.session.context import STDIN

    text: str = args.context
    if text == "-":
        if args.file == STDIN:
            raise ConfigError("can't use stdin for both build context and dockerfile")
        import shutil
        import tempfile

        from ociworker.controller import unpack_stdin_context

        tmp = Path(tempfile.mkdtemp(prefix="ociworker-stdin-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        ctx, dockerfile = unpack_stdin_context(sys.stdin.buffer.read(), tmp)
        return ctx, "", args.file if dockerfile is None else dockerfile
    if not os.path.isdir(text) and is_remote_context(text):
        return Path("."), text, args.file
    return Path(text), "", args.file


async def _build(
    args: argparse.Namespace,
    context: Path,
    context_url: str,
    dockerfile: Path | None,
    graph: BuildDefinition | None = None,
) -> int:
    progress = _progress_mode(args)
    printer: EventSink
    view: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if progress == "rawjson":
        printer = RawJSONPrinter(sys.stderr)
    elif progress == "quiet":
        printer = QuietPrinter()
    elif progress == "tty":
        from ociworker.progress_ui import TTYPrinter, require_console

        require_console(sys.stderr)  # before anything runs, as buildx; rich loads only here

        printer = view = TTYPrinter()
    else:
        printer = PlainPrinter(sys.stderr)
    if args.debug or args.log_format == "json":
        printer = _logged(printer)
    _check_tags(args.tag)
    outputs = tuple(OutputSpec.parse(o) for o in args.output)
    if args.push:
        outputs = with_push(outputs)
    # checked here too: a bad flag is refused before anything starts
    parse_annotations(args.annotation)
    _registry_ca(args.registry_ca)
    if args.registry_ca and args.addr:
        # the daemon talks to the registry: trusting a CA is its config's business
        raise ConfigError(
            "--registry-ca configures the embedded worker; a daemon trusts the CAs "
            'its config names ([registry."HOST"] ca = [...])'
        )
    req = BuildRequest(
        context=context,
        context_url=context_url,
        dockerfile=dockerfile,
        tags=tuple(args.tag),
        build_args=_build_args(args.build_arg),
        target=args.target,
        outputs=outputs,
        no_cache=args.no_cache,
        network=args.network,
        extra_hosts=tuple(parse_add_host(h) for h in args.add_host),
        ulimits=tuple(Ulimit.parse(u) for u in args.ulimit),
        shm_size=parse_ram_size(args.shm_size) if args.shm_size is not None else None,
        iidfile=args.iidfile,
        metadata_file=args.metadata_file,
        # buildx -q prints the image ID even when nothing is exported
        want_image=args.quiet,
        allow=parse_entitlements(args.allow, "--allow"),
        cache_to=parse_cache_specs(args.cache_to, export=True, over_daemon=bool(args.addr)),
        cache_from=parse_cache_specs(args.cache_from, export=False, over_daemon=bool(args.addr)),
        annotations=tuple(args.annotation),
        labels=parse_labels(args.label),
        build_contexts=_build_contexts(args.build_context),
        platforms=tuple(args.platform),
        pull=args.pull,
        no_cache_filter=tuple(
            n.strip() for item in args.no_cache_filter for n in item.split(",") if n.strip()
        ),
        explain_cache=args.explain_cache,
        verify_cache=args.verify_cache,
        frontend=args.frontend,
    )
    from ociworker import plugins

    if args.check:
        if plugins.get(req.frontend).frontend is not None:
            raise ConfigError(f"--check lints Dockerfiles; not with --frontend {req.frontend}")
        return await _check(args, req)
    if not args.addr:
        plugins.get(req.frontend)  # an unknown name is refused before the worker starts
    # Every path the build reads or writes, before anything runs or is created.
    from ociworker.session.preflight import check_build_paths

    if not args.addr:
        # A runtime that is not there is refused before the state dir is made.
        from ociworker.worker import default_runtime, find_runtime

        find_runtime(args.runtime or default_runtime())
    check_build_paths(req, root=None if args.addr else args.root)
    # Parsed before the worker opens anything: a bad flag changes nothing.
    from ociworker.session.secrets import LocalSecrets, SecretSource

    secret_sources = [SecretSource.parse(s) for s in args.secret]
    secrets = LocalSecrets(secret_sources)
    ssh: SSHAgents = NoSSH()
    ssh_ids: list[str] = []
    if args.ssh:  # the agent needs `cryptography`, ~35 ms of start-up: only when asked
        from ociworker.session.sshagent import LocalSSHAgents, SSHSource

        ssh_sources = [SSHSource.parse(s) for s in args.ssh]
        ssh_ids = [s.id for s in ssh_sources]
        ssh = LocalSSHAgents(ssh_sources)
    _log.debug(
        "build requested",
        context=redact(req.context_url) if req.context_url else str(req.context),
        dockerfile=str(req.dockerfile or ""),
        outputs=[o.type for o in req.outputs],
        tags=list(req.tags),
        addr=args.addr or "embedded",
    )
    if len(args.addrs) > 1:
        # A fleet: the context picks the worker, the next takes over when it is down.
        from ociworker.api.fleet import Fleet

        async with Fleet(
            args.addrs, tlscacert=args.tlscacert, tlscert=args.tlscert, tlskey=args.tlskey
        ) as fleet:
            with view:
                _state.phase = Phase.SOLVE
                result = await fleet.build(
                    req,
                    events=printer,
                    announce=_announcer(printer),
                    secrets=secrets,
                    secret_ids=[s.id for s in secret_sources],
                    ssh=ssh,
                    ssh_ids=ssh_ids,
                    credentials=DockerConfigCredentials(),
                    definition=graph,
                )
    elif args.addr:
        # On a daemon, this process serves the same secrets, agents and docker
        # login through the build's session.
        async with _client(args) as client:
            with view:
                _state.phase = Phase.SOLVE
                result = await client.build(
                    req,
                    events=printer,
                    secrets=secrets,
                    secret_ids=[s.id for s in secret_sources],
                    ssh=ssh,
                    ssh_ids=ssh_ids,
                    credentials=DockerConfigCredentials(),
                    definition=graph,
                )
    else:
        from ociworker import controller
        from ociworker.session.context import STDIN, read_definition, read_stdin_dockerfile

        definition: BuildDefinition | None = graph
        if definition is not None:
            pass  # --frontend graph.v1: read already
        elif not req.context_url:
            definition = read_definition(req.context, req.dockerfile)
        elif req.dockerfile == STDIN:
            definition = BuildDefinition(read_stdin_dockerfile(), "Dockerfile")
        gc = _gc_config(args.config)
        worker = _worker(args)
        try:
            with view:  # the tty view prints its final state on every way out
                _state.phase = Phase.SOLVE
                # The embedded build lends the caller's own docker login, as buildx does.
                result = await controller.build(
                    worker,
                    req,
                    definition,
                    printer,
                    credentials=DockerConfigCredentials(),
                    secrets=secrets,
                    ssh=ssh,
                )
            if gc.enabled:  # after the build, as buildkitd's GC
                try:
                    st = os.statvfs(worker.root)
                    policies = gc.effective(st.f_blocks * st.f_frsize)
                    await controller.collect_garbage(worker, policies, skip_unchanged=True)
                except (OSError, OciworkerError) as exc:  # the build itself succeeded
                    _log.warning("gc failed", error=str(exc))
        finally:
            await worker.aclose()
    _state.phase = Phase.SETUP
    _log.info(
        "build finished",
        image=result.manifest.digest if result.manifest else None,
        config=result.config_digest,
    )
    if args.quiet and result.config_digest:
        # -q prints the ID (buildx); --progress=quiet alone only silences progress
        # stdout belongs to an archive written there (dest=-); the id must not corrupt it
        to_stdout = any(o.to_stdout for o in req.outputs)
        print(result.config_digest, file=sys.stderr if to_stdout else sys.stdout)
    elif result.manifest is not None and progress not in ("rawjson", "quiet"):
        # rawjson's stream holds status objects only, quiet nothing; the digest
        # is in --metadata-file
        print(f"image digest: {result.manifest.digest}", file=sys.stderr)
    return 0


def _announcer(printer: EventSink) -> Callable[[str], None] | None:
    """Where the fleet's "building with worker" line goes: a progress line in
    plain and rawjson (the default), above the live view in tty (which shows
    a line only under a step, and none runs yet), nowhere with quiet."""
    from ociworker.progress_ui import TTYPrinter

    if isinstance(printer, QuietPrinter):
        return lambda line: None
    if isinstance(printer, TTYPrinter):
        console = printer.console
        return lambda line: console.print(line, highlight=False, markup=False)
    return None


def _resolve_addrs(args: argparse.Namespace) -> None:
    """``args.addrs``: every --addr given, else $OCIWORKER_HOST; ``args.addr`` its
    first (or None: the embedded worker). Only a build spreads over a fleet."""
    addrs: list[str] = args.addr or (
        [os.environ["OCIWORKER_HOST"]] if os.environ.get("OCIWORKER_HOST") else []
    )
    if len(addrs) > 1 and args.command != "build":
        raise UsageError(
            f"{args.command} works on one daemon: give one --addr", f"ociworker {args.command}"
        )
    args.addrs = addrs
    args.addr = addrs[0] if addrs else None


def _logged(sink: EventSink) -> EventSink:
    """``sink``, also logging each step's state change (debug) and each warning:
    what ``--debug`` promises, in the ``--log-format`` asked for."""
    from ociworker.core.progress import VertexStatus, Warning

    def logged(ev: Event) -> None:
        if isinstance(ev, VertexStatus):
            state = (
                "cached"
                if ev.cached
                else "failed"
                if ev.error
                else "done"
                if ev.completed is not None
                else "started"
            )
            fields: dict[str, object] = {"step": ev.name, "vertex": ev.digest}
            if ev.started is not None and ev.completed is not None:
                fields["seconds"] = round(ev.completed - ev.started, 3)
            if ev.error:
                fields["error"] = ev.error
            _log.debug(f"step {state}", **fields)
        elif isinstance(ev, Warning):
            _log.info("build warning", message=ev.message)
        sink(ev)

    return logged


def _client(args: argparse.Namespace) -> Client:
    from ociworker.api.client import Client

    return Client(args.addr, tlscacert=args.tlscacert, tlscert=args.tlscert, tlskey=args.tlskey)


async def _cmd_du(args: argparse.Namespace) -> int:
    flt = PruneFilter.parse(args.filter)
    if args.addr:
        async with _client(args) as client:
            records = await client.disk_usage()
    else:
        from ociworker import controller

        worker = _worker(args)
        try:
            records = await controller.disk_usage(worker)
        finally:
            await worker.aclose()
    now = time.time()
    records = [r for r in records if flt.matches(r, now=now)]
    # smallest first: the records that matter most end next to the totals
    records.sort(key=lambda r: (r.size, r.id))
    print(format_usage(records, verbose=args.verbose, now=now), end="")
    shared = sum(r.size for r in records if r.shared)
    total = sum(r.size for r in records)
    rows = []
    if shared:
        rows += [("Shared:", shared), ("Private:", total - shared)]
    rows += [("Reclaimable:", sum(r.size for r in records if r.reclaimable)), ("Total:", total)]
    for label, n in rows:
        print(f"{label:<16}{human_size(n)}")
    return 0


async def _cmd_prune(args: argparse.Namespace) -> int:
    # Parsed before the worker opens anything; a filter we cannot honour is
    # refused, never ignored (ignoring it would prune everything).
    from ociworker.core.gc import PruneOptions

    opts = PruneOptions(
        filter=PruneFilter.parse(args.filter),
        all=args.all,
        keep_storage=parse_size(args.keep_storage),
        keep_duration=parse_duration(args.keep_duration),
    )
    if args.addr:
        async with _client(args) as client:
            removed = await client.prune(
                all=opts.all,
                filters=args.filter,
                keep_storage=opts.keep_storage,
                keep_duration=opts.keep_duration,
            )
    else:
        from ociworker import controller

        worker = _worker(args)
        try:
            removed = await controller.prune(worker, opts)
        finally:
            await worker.aclose()
    print(format_usage(removed, verbose=args.verbose, now=time.time()), end="")
    print(f"{'Total:':<16}{human_size(sum(r.size for r in removed))}")
    return 0


def _gc_config(path: Path | None) -> GCConfig:
    """The GC part of ``--config`` (serve's TOML; its other keys are the daemon's)."""
    if path is None:
        return GCConfig()
    import tomllib

    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return gc_config(values.get("worker", {}), f"config file {path}")


def format_usage(records: Sequence[UsageRecord], *, verbose: bool, now: float) -> str:
    """buildx's du table (ID, RECLAIMABLE, SIZE, LAST ACCESSED; a mutable
    record's id and a shared record's size marked ``*``) or, verbose, its
    per-record blocks."""
    lines: list[str] = []
    if verbose:
        for r in records:
            fields = [("ID:", r.id.removeprefix("sha256:"))]
            if len(r.parents) == 1:
                fields.append(("Parent:", r.parents[0].removeprefix("sha256:")))
            elif r.parents:
                fields.append(("Parents:", ""))
            fields += [
                ("Created at:", _timestamp(r.created)),
                ("Mutable:", str(r.mutable).lower()),
                ("Reclaimable:", str(r.reclaimable).lower()),
                ("Shared:", str(r.shared).lower()),
                ("Size:", human_size(r.size)),
            ]
            if r.description:
                fields.append(("Description:", r.description))
            fields.append(("Usage count:", str(r.usage_count)))
            if r.last_used:
                fields.append(("Last used:", _ago(r.last_used, now)))
            fields.append(("Type:", r.type))
            lines += [f"{k:<16}{v}".rstrip() for k, v in fields]
            lines += [f"{'':<16}- {p.removeprefix('sha256:')}" for p in r.parents[1:]]
            lines.append("")
        return "".join(line + "\n" for line in lines)
    if records:
        lines.append(f"{'ID':<40}\t{'RECLAIMABLE':<11}\t{'SIZE':<10}\tLAST ACCESSED")
    for r in records:
        rid = r.id.removeprefix("sha256:")[:25] + ("*" if r.mutable else "")
        size = human_size(r.size) + ("*" if r.shared else "")
        last = _ago(r.last_used, now) if r.last_used else ""
        lines.append(f"{rid:<40}\t{str(r.reclaimable).lower():<11}\t{size:<10}\t{last}".rstrip())
    return "".join(line.expandtabs(8) + "\n" for line in lines)


def _timestamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f %z UTC")


def _ago(t: float, now: float) -> str:
    """go-units HumanDuration of ``now - t`` + " ago", as buildx prints it."""
    s = max(0.0, now - t)
    if s < 1:
        return "Less than a second ago"
    if s < 2:
        return "1 second ago"
    if s < 60:
        return f"{int(s)} seconds ago"
    m = s / 60
    if m < 2:
        return "About a minute ago"
    if m < 60:
        return f"{int(m)} minutes ago"
    h = m / 60
    if h < 1.5:
        return "About an hour ago"
    if h < 48:
        return f"{round(h)} hours ago"
    if h < 24 * 7 * 2:
        return f"{int(h / 24)} days ago"
    if h < 24 * 30 * 2:
        return f"{int(h / 24 / 7)} weeks ago"
    if h < 24 * 365 * 2:
        return f"{int(h / 24 / 30)} months ago"
    return f"{int(h / 24 / 365)} years ago"


def serve_config(args: argparse.Namespace) -> DaemonConfig:
    """The daemon's config from ``serve``'s flags over its --config file (also
    what deploy/'s tests check the units' and manifests' command lines with)."""
    from ociworker.api import daemon

    overrides = {
        "addr": args.addr,
        "root": args.root,
        "group": args.group,
        "tlscacert": args.tlscacert,
        "tlscert": args.tlscert,
        "tlskey": args.tlskey,
        "runtime": args.runtime,
        "snapshotter": args.snapshotter,
        "insecure_registries": args.insecure_registry,
        "max_parallelism": args.max_parallelism,
        "log_cap": args.log_cap,
        "step_memory": args.step_memory,
        "step_pids": args.step_pids,
        "step_cpus": args.step_cpus,
    }
    return daemon.load_config(args.config, overrides)


async def _cmd_serve(args: argparse.Namespace) -> int:
    from ociworker.api import daemon

    return await daemon.serve(serve_config(args))


async def _main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        # SIGINT and SIGTERM cancel the command, so containers and mounts are
        # released; which one it was decides the exit code (130 or 143).
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, _cancel, task, signum)
    if args.command == "build":
        return await _cmd_build(args)
    if args.command == "du":
        return await _cmd_du(args)
    if args.command == "serve":
        return await _cmd_serve(args)
    if args.command == "history":
        from ociworker.cli.history import cmd_history

        return await cmd_history(args, _client, _worker)
    if args.command == "doctor":
        from ociworker.cli.doctor import cmd_doctor

        return cmd_doctor(args)
    if args.command == "info":
        from ociworker.cli.info import cmd_info

        return await cmd_info(args)
    return await _cmd_prune(args)


def _cancel(task: asyncio.Task[int], signum: int) -> None:
    if _state.signum is None:
        _state.signum = signum
    task.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    _state.phase, _state.signum, _state.root = Phase.SETUP, None, None
    parser = make_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # Reported against the subcommand the user typed, in buildx's words.
            what = (
                f"unknown flag: {extra[0]}"
                if extra[0].startswith("-")
                else (f"unexpected argument {extra[0]!r}")
            )
            raise UsageError(what, f"ociworker {args.command}")
        log.configure(args.log_format, args.debug, info=args.command == "serve")
        if args.command not in ("serve", "doctor"):
            _resolve_addrs(args)
        _state.root = getattr(args, "root", None)
        # rootless (and its imports) only for an ordinary user: root and a daemon's
        # client never need it
        if _embedded(args) and os.geteuid() != 0:
            from ociworker import rootless

            if rootless.needed():
                # An ordinary user's worker runs as root of a user namespace of its own.
                return rootless.run(list(sys.argv[1:] if argv is None else argv))
        return asyncio.run(_main(args))
    except BaseException as exc:  # the one place that maps every way out to words
        if isinstance(exc, SystemExit):  # --help, --version
            raise
        failure = describe(exc, phase=_state.phase, signum=_state.signum, trace_dir=_state.root)
        if isinstance(exc, BrokenPipeError):
            _silence_stdout()
        print(failure.render(), file=sys.stderr)
        return failure.exit_code


def _embedded(args: argparse.Namespace) -> bool:
    """Whether the command runs a worker in this process (or is one: serve)."""
    return args.command == "serve" or (
        args.command in ("build", "du", "prune", "history") and not getattr(args, "addr", None)
    )


def _silence_stdout() -> None:
    # Python flushes stdout once more at exit; with the reader gone that would
    # print its own "Exception ignored ... BrokenPipeError" after our message.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
