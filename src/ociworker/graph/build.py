"""Turning a ``State`` into something that runs: its base images resolved
(``plan``), its serialized definition (``definition``), or an image built by an
embedded worker (``build``). The IO half of ``ociworker.graph``; the lowering
itself is pure (``ociworker.graph.lower``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ociworker.core.build import DEFAULT_ROOT, NAMED_LOCAL_PREFIX, BuildRequest, BuildResult
from ociworker.core.oci import Platform
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import EventSink, discard
from ociworker.core.reference import parse_reference
from ociworker.core.session import Credentials, Secrets, SSHAgents
from ociworker.definition import Format, encode
from ociworker.errors import RegistryError, UserError
from ociworker.frontend.dockerfile.convert import CONTEXT, ImageInfo, Plan
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.graph.lower import _post_order, image_refs, lower
from ociworker.graph.state import LocalNode, State

#: what ``definition`` writes (the serialized graph: ``ociworker.definition``)
FORMATS = ("pb", "json")


class ImageResolver(Protocol):
    """Pins an image reference as a build would: ``name@sha256:...`` and its config."""

    async def resolve(self, ref: str) -> ImageInfo: ...


class RegistryResolver:
    """Resolves at the image's registry (anonymous, or with ``credentials``):
    what ``definition`` uses when no worker is at hand. A tag only a worker's
    image store holds (``-t`` of an earlier build) is not seen; ``build``
    resolves on its worker, image store first, as ``ociworker build`` does."""

    def __init__(
        self,
        platform: Platform | None = None,
        credentials: Credentials | None = None,
        insecure_registries: Sequence[str] = (),
    ) -> None:
        self.platform = platform or _host_platform()
        self.credentials = credentials
        self.insecure = tuple(insecure_registries)

    async def resolve(self, ref: str) -> ImageInfo:
        from ociworker.registry.client import RegistryClient

        parsed = parse_reference(ref)
        async with RegistryClient(insecure=self.insecure, credentials=self.credentials) as client:
            got = await client.resolve(parsed, self.platform)
        return ImageInfo(
            ref=f"{parsed.repository}@{got.manifest.digest}", config=json.loads(got.config_json)
        )


def _host_platform() -> Platform:
    import os

    return Platform.parse(os.uname().machine)


async def plan(
    state: State,
    resolver: ImageResolver,
    platform: Platform | None = None,
    context_ignore: Sequence[str] = (),
) -> Plan:
    """``state`` lowered with its base images resolved by ``resolver``: the graph
    and image config a build runs (what the Dockerfile frontend's ``Plan`` is).
    ``context_ignore``: the context's .dockerignore patterns (``lower``)."""
    if not isinstance(state, State):
        raise UserError(f"expected an ociworker.graph State, not {type(state).__name__}")
    refs = image_refs(state)
    got = await asyncio.gather(*(resolver.resolve(r) for r in refs), return_exceptions=True)
    images: dict[str, ImageInfo] = {}
    for ref, info in zip(refs, got, strict=True):
        if isinstance(info, RegistryError):
            # BuildKit's words, so the image is named whatever the cause
            raise RegistryError(
                f"{ref}: failed to resolve source metadata for {parse_reference(ref)}: {info}"
            ) from info
        if isinstance(info, BaseException):
            raise info
        images[ref] = info
    out = lower(state, images, platform or getattr(resolver, "platform", None), context_ignore)
    if out.missing:  # a resolver that answered for another name
        raise UserError("images not resolved: " + ", ".join(out.missing))
    return out


async def definition_async(
    state: State,
    format: str = "pb",
    *,
    resolver: ImageResolver | None = None,
    platform: Platform | None = None,
) -> bytes:
    """The serialized graph of ``state`` (``format``: ``pb``, the protobuf
    document, or ``json``, its canonical JSON form), which ``ociworker build
    --frontend graph.v1 FILE`` and a daemon's ``Solve`` build. Base images are
    resolved at their registry (``resolver``: another way), so the document
    is pinned."""
    if format not in FORMATS:
        raise UserError(f"unknown definition format {format!r}: use pb or json")
    resolved = await plan(state, resolver or RegistryResolver(platform), platform)
    fmt: Format = "json" if format == "json" else "pb"
    return encode(resolved.target, resolved.config, fmt)


def definition(
    state: State,
    format: str = "pb",
    *,
    resolver: ImageResolver | None = None,
    platform: Platform | None = None,
) -> bytes:
    """``definition_async`` for callers without an event loop."""
    _no_loop("definition")
    return asyncio.run(definition_async(state, format, resolver=resolver, platform=platform))


def _no_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise UserError(f"ociworker.graph.{name}() runs its own event loop: await {name}_async()")


def local_dirs(
    state: State,
    context: Path,
    contexts: Mapping[str, str | Path],
    context_ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """The local sources ``state`` reads, as the worker's job names them: the
    context as ``context``, the others as a Dockerfile's named contexts, each
    with the include / exclude patterns its ``local()`` gave (the context with
    none: ``context_ignore``, its .dockerignore's)."""
    from ociworker.ops.context import LocalContext

    out: dict[str, Any] = {}
    for st in _post_order(state):
        node = st.node
        if not isinstance(node, LocalNode):
            continue
        if node.name == CONTEXT:
            key, where = CONTEXT, context
        else:
            if node.name not in contexts:
                raise UserError(
                    f"local({node.name!r}): no such context; pass contexts={{{node.name!r}: DIR}}"
                )
            key, where = NAMED_LOCAL_PREFIX + node.name, Path(contexts[node.name])
        patterns: list[str] = []
        if node.include:
            # everything out, then back in what an include names (.dockerignore's "!")
            patterns = ["*", *("!" + p for p in node.include)]
        patterns += node.exclude
        if key == CONTEXT and not patterns:
            patterns = list(context_ignore)
        prior = out.get(key)
        mine = IgnoreMatcher(patterns).patterns
        if prior is not None and (prior.ignore.patterns if prior.ignore else ()) != mine:
            raise UserError(
                f"local({node.name!r}) is used with two different include/exclude lists"
            )
        where = where.absolute()
        if not where.is_dir():
            raise UserError(f"local({node.name!r}): {where} is not a directory")
        out[key] = LocalContext(where, IgnoreMatcher(patterns) if patterns else None)
    return out


async def build_async(
    state: State,
    *,
    tags: Sequence[str] = (),
    outputs: Sequence[str] = (),
    context: str | Path = ".",
    contexts: Mapping[str, str | Path] | None = None,
    root: str | Path | None = None,
    runtime: str = "runc",
    no_cache: bool = False,
    allow: Sequence[str] = (),
    secrets: Sequence[str] | Secrets = (),
    ssh: Sequence[str] | SSHAgents = (),
    credentials: Credentials | None = None,
    events: EventSink = discard,
    metadata_file: str | Path | None = None,
    addr: str | None = None,
) -> BuildResult:
    """Build ``state`` on an embedded worker (root: ``root``, else
    ``$OCIWORKER_ROOT``, else /var/lib/ociworker; needs root privileges, as
    ``ociworker build``). ``outputs`` are ``-o`` values (``type=oci,dest=F``,
    a dir, ...), ``tags`` go to the image store; the result's ``manifest``
    is the image. ``secrets`` and ``ssh`` are ``--secret`` / ``--ssh`` values
    (``id=npmrc,src=FILE``, ``default``) or the session's own providers;
    registry credentials are docker's config unless ``credentials`` says.
    Every step is keyed as the equivalent Dockerfile's, so both builds share
    their cache. ``addr``: build on that daemon instead (``unix:///PATH``,
    ``tcp://HOST:PORT``), through its ``graph.v1`` frontend, with ``context``
    sent as the build's context."""
    import os

    if addr is not None:
        return await _on_daemon(
            state,
            addr,
            tags=tags,
            outputs=outputs,
            context=Path(context),
            contexts=contexts or {},
            no_cache=no_cache,
            allow=allow,
            secrets=secrets,
            ssh=ssh,
            credentials=credentials,
            events=events,
            metadata_file=metadata_file,
        )

    from ociworker import controller
    from ociworker.session.credentials import DockerConfigCredentials
    from ociworker.session.preflight import check_worker_root
    from ociworker.worker import WorkerConfig, open_worker

    where = Path(root or os.environ.get("OCIWORKER_ROOT") or DEFAULT_ROOT)
    from ociworker.session.context import read_ignore_file

    ctx = Path(context)
    # The context's .dockerignore, as a Dockerfile build of it reads it: a
    # local() of the context with no include / exclude of its own takes it
    # (the same files, the same source vertex, so both builds share the cache).
    ignore = read_ignore_file(ctx, None) if ctx.is_dir() else ()
    dirs = local_dirs(state, ctx, contexts or {}, ignore)
    req = BuildRequest(
        context=ctx,
        tags=tuple(tags),
        outputs=tuple(OutputSpec.parse(o) for o in outputs),
        no_cache=no_cache,
        allow=tuple(allow),
        metadata_file=Path(metadata_file) if metadata_file is not None else None,
    )
    lent_secrets = _secrets(secrets)
    lent_ssh = _ssh(ssh)
    credentials = credentials or DockerConfigCredentials()
    # as ociworker build: a clear error for a user who may not run the worker
    check_worker_root(where)
    worker = open_worker(WorkerConfig(root=where, runtime=runtime))
    try:

        class _OnWorker:
            async def resolve(self, ref: str) -> ImageInfo:
                return await controller.resolve_image(worker, ref, credentials)

        made = await plan(state, _OnWorker(), worker.config.platform, ignore)
        return await controller.build(
            worker,
            req,
            None,
            events,
            credentials=credentials,
            secrets=lent_secrets,
            ssh=lent_ssh,
            plan=made,
            local_dirs=dirs,
        )
    finally:
        await worker.aclose()


async def _on_daemon(
    state: State,
    addr: str,
    *,
    tags: Sequence[str],
    outputs: Sequence[str],
    context: Path,
    contexts: Mapping[str, str | Path],
    no_cache: bool,
    allow: Sequence[str],
    secrets: Sequence[str] | Secrets,
    ssh: Sequence[str] | SSHAgents,
    credentials: Credentials | None,
    events: EventSink,
    metadata_file: str | Path | None,
) -> BuildResult:
    """``state``'s definition built by the daemon at ``addr`` (``ociworker.Client``)."""
    from ociworker.api.client import Client
    from ociworker.core.build import NamedContext
    from ociworker.session.credentials import DockerConfigCredentials

    for st in _post_order(state):
        if isinstance(st.node, LocalNode) and (st.node.include or st.node.exclude):
            raise UserError(
                f"local({st.node.name!r}, include=, exclude=) is honoured by the embedded "
                "worker only: a daemon reads the context's .dockerignore"
            )
    if isinstance(secrets, str):
        secrets = [secrets]
    if isinstance(ssh, str):
        ssh = [ssh]
    if not isinstance(secrets, Sequence) or not isinstance(ssh, Sequence):
        raise UserError("on a daemon, pass secrets and ssh as --secret / --ssh values")
    from ociworker.session.secrets import SecretSource

    secret_ids = [SecretSource.parse(s).id for s in secrets]
    ssh_ids: list[str] = []
    if ssh:
        from ociworker.session.sshagent import SSHSource

        ssh_ids = [SSHSource.parse(s).id for s in ssh]
    dirs = local_dirs(state, context, contexts)
    named = tuple(
        NamedContext(key.removeprefix(NAMED_LOCAL_PREFIX), "local", str(ctx.root))
        for key, ctx in dirs.items()
        if key.startswith(NAMED_LOCAL_PREFIX)
    )
    credentials = credentials or DockerConfigCredentials()
    from ociworker.session.context import read_ignore_file

    # the daemon selects the context's files by its .dockerignore (the client
    # sends those rules): the context's source vertex says so, as a Dockerfile's
    ignore = read_ignore_file(context, None) if context.is_dir() else ()
    made = await plan(state, RegistryResolver(credentials=credentials), None, ignore)
    data = encode(made.target, made.config, "pb")
    async with Client(addr) as client:
        return await client.build(
            context,
            events=events,
            secrets=_secrets(secrets),
            secret_ids=secret_ids,
            ssh=_ssh(ssh),
            ssh_ids=ssh_ids,
            credentials=credentials,
            definition=data,
            frontend="graph.v1",
            tags=tuple(tags),
            outputs=tuple(outputs),
            build_contexts=named,
            no_cache=no_cache,
            allow=tuple(allow),
            metadata_file=Path(metadata_file) if metadata_file is not None else None,
        )


def _secrets(given: Sequence[str] | Secrets) -> Secrets:
    from ociworker.session.secrets import LocalSecrets, SecretSource

    if isinstance(given, str):
        given = [given]
    if isinstance(given, Sequence):
        return LocalSecrets([SecretSource.parse(s) for s in given])
    return given


def _ssh(given: Sequence[str] | SSHAgents) -> SSHAgents:
    from ociworker.core.session import NoSSH

    if isinstance(given, str):
        given = [given]
    if not isinstance(given, Sequence):
        return given
    if not given:
        return NoSSH()
    from ociworker.session.sshagent import LocalSSHAgents, SSHSource

    return LocalSSHAgents([SSHSource.parse(s) for s in given])


def build(state: State, **options: Any) -> BuildResult:
    """``build_async`` for callers without an event loop."""
    _no_loop("build")
    return asyncio.run(build_async(state, **options))
