"""Builds: Dockerfile -> plan -> solve -> export. Owns one build end to end."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ociworker import plugins
from ociworker.content.image import read_image
from ociworker.core.build import (
    BuildDefinition,
    BuildRequest,
    BuildResult,
    UsageRecord,
    check_platforms,
)
from ociworker.core.digest import sha256_bytes
from ociworker.core.gc import GCPolicy, PruneOptions
from ociworker.core.gitref import KEEP_GIT_DIR_ARG, redact
from ociworker.core.graph import ExecOp, Vertex
from ociworker.core.history import explain, explain_lines
from ociworker.core.oci import INDEX_TYPES, Descriptor, Platform
from ociworker.core.outputs import check_outputs, parse_annotations
from ociworker.core.progress import (
    Event,
    EventSink,
    Info,
    ProgressStep,
    VertexStatus,
    Warning,
    cap_logs,
    discard,
    error_line,
)
from ociworker.core.reference import parse_reference
from ociworker.core.session import (
    Credentials,
    NoCredentials,
    NoSecrets,
    NoSSH,
    Secrets,
    SSHAgents,
)
from ociworker.errors import (
    ConfigError,
    DockerfileError,
    OciworkerError,
    RegistryError,
    UserError,
)
from ociworker.exporter.assemble import (
    compression_opts,
    epoch_warnings,
    force_compression,
    make_image,
    with_epoch,
)
from ociworker.exporter.base import ExportParts, ExportResult, SolveWatch, all_image_names
from ociworker.exporter.chain import ChainLayers, SnapshotLayers
from ociworker.exporter.exporters import resolve_outputs
from ociworker.exporter.image import ImageResult
from ociworker.exporter.target import ExportTarget, LocalExportTarget, write_errors
from ociworker.frontend.base import FrontendInputs
from ociworker.frontend.dockerfile.convert import ImageInfo, Options, Plan, convert
from ociworker.frontend.dockerfile.lint import BaseImage as BaseImage
from ociworker.frontend.dockerfile.lint import BaseRef as BaseRef
from ociworker.frontend.dockerfile.lint import base_images, lint, report
from ociworker.frontend.dockerfile.parser import parse, syntax_of
from ociworker.fs.atomic import write_atomic
from ociworker.fs.ignore import IgnoreMatcher, read_dir_ignore
from ociworker.fs.reader import ContextFiles
from ociworker.fs.userns import CGROUP_WARNING
from ociworker.ops.context import LocalContext
from ociworker.ops.exec import check_entitlements as exec_entitlements
from ociworker.ops.history import BuildRecorder
from ociworker.ops.remotecontext import open_remote_context
from ociworker.ops.remotecontext import unpack_stdin_context as unpack_stdin_context
from ociworker.remotecache.exporter import ExportInputs, add_inline_cache, collect, export_caches
from ociworker.remotecache.importer import CacheImport, ImportedLayers, ImportParts, load_imports
from ociworker.snapshot import access
from ociworker.solver.scheduler import REMOTE, Job
from ociworker.sources.git import GitFetcher
from ociworker.sources.http import HttpFetcher
from ociworker.sources.image import LAYER_SNAPSHOT_PREFIX
from ociworker.sources.ocilayout import load_layout_image
from ociworker.worker import Worker


async def plan_build(
    worker: Worker,
    req: BuildRequest,
    definition: BuildDefinition,
    events: EventSink = discard,
    credentials: Credentials | None = None,
) -> Plan:
    with ProgressStep(events, "[internal] load build definition from Dockerfile"):
        parsed = parse(definition.dockerfile, definition.filename)
    opts = Options(
        build_args=dict(req.build_args),
        target=req.target,
        platform=worker.config.platform,
        network=req.network,
        extra_hosts=req.extra_hosts,
        ulimits=req.ulimits,
        shm_size=req.shm_size or 0,
        ignore_patterns=definition.ignore_patterns,
        filename=definition.filename,
        no_cache=req.no_cache,
        named_contexts={nc.name: nc for nc in req.build_contexts},
        no_cache_filter=req.no_cache_filter,
    )
    images: dict[str, ImageInfo] = await _layout_images(worker, req)
    for _ in range(16):  # each round resolves the bases the previous one found
        plan = convert(parsed, opts, images)
        if not plan.missing:
            break
        hints = dict(plan.from_errors)
        # Failures are raised inside the step, so it ends ERROR with their reason.
        with ProgressStep(events, "[internal] load metadata for " + ", ".join(plan.missing)):
            got = await asyncio.gather(
                *(resolve_image(worker, m, credentials, pull=req.pull) for m in plan.missing),
                return_exceptions=True,
            )
            for name, info in zip(plan.missing, got, strict=True):
                if isinstance(info, OciworkerError) and name in hints:
                    # ``COPY --from=name`` where name is no stage: most likely a typo of
                    # a stage name, which the registry's "not found" would hide.
                    raise hints[name] from info
                if isinstance(info, RegistryError):
                    # BuildKit's words, so the image is named whatever the cause
                    raise RegistryError(
                        f"{name}: failed to resolve source metadata for "
                        f"{parse_reference(name)}: {info}"
                    ) from info
                if isinstance(info, BaseException):
                    raise info
                images[name] = info
    else:
        raise DockerfileError("base images could not be resolved (too many rounds)")
    for w in plan.warnings:
        events(Warning(w))
    return plan


def choose_frontend(req: BuildRequest, definition: BuildDefinition) -> plugins.Chosen:
    """The frontend that reads ``definition``: ``--frontend`` (default
    dockerfile.v0), and for the Dockerfile frontend the frontend its
    ``# syntax=`` line names when that is a registered one (an image reference
    that names none keeps the Dockerfile frontend, which warns about it)."""
    chosen = plugins.get(req.frontend)
    if chosen.frontend is None and definition.dockerfile:
        syntax = syntax_of(definition.dockerfile)
        if syntax and plugins.known(syntax):
            return plugins.get(syntax)
    return chosen


async def plan_frontend(
    worker: Worker,
    chosen: plugins.Chosen,
    req: BuildRequest,
    definition: BuildDefinition,
    context_root: Path,
    events: EventSink = discard,
) -> Plan:
    """The plan of a frontend other than the Dockerfile's: it reads the
    definition and the context through a confined reader and returns a graph,
    which is checked whole (``ociworker.definition``: op types, sizes, paths,
    digests) before anything runs. Its layers' history is made after the
    solve (``frontend_history``): the graph does not say how many layers its
    base images bring."""
    assert chosen.frontend is not None
    opts = {f"build-arg:{k}": v for k, v in req.build_args.items()}
    if req.target:
        opts["target"] = req.target
    opts.update(req.frontend_opts)
    inputs = FrontendInputs(
        definition=definition.source or definition.dockerfile.encode(),
        filename=definition.filename,
        context=ContextFiles(context_root, IgnoreMatcher(definition.ignore_patterns)),
        opts=opts,
    )
    with ProgressStep(
        events, f"[internal] load build definition from {definition.filename} ({chosen.name})"
    ):
        try:
            result = await asyncio.to_thread(chosen.frontend.solve, inputs)
        except OciworkerError:
            raise
        except Exception as exc:  # a plugin's bug is the build's error, not a traceback
            raise UserError(f"frontend {chosen.name} failed: {type(exc).__name__}: {exc}") from None
        check_frontend_result(chosen.name, result)
        # Whatever the frontend built, the worker solves only a graph that
        # survives its own serialized form's checks.
        target = result.target
        if target is not None:
            # the protobuf runtime loads for these frontends only, not for a Dockerfile
            from ociworker.definition import decode as decode_definition
            from ociworker.definition import encode as encode_definition

            target = await asyncio.to_thread(
                lambda: decode_definition(encode_definition(target)).target
            )
    config: dict[str, Any] = dict(result.image_config)
    for k, v in worker.config.platform.to_json().items():
        config.setdefault(k, v)
    config["config"] = dict(config.get("config") or {})
    config.pop("rootfs", None)
    config["history"] = [dict(h) for h in config.get("history") or ()]
    return Plan(
        target=target, config=config, base_history=(), base_layers=0, missing=(), warnings=()
    )


def check_frontend_result(name: str, result: object) -> None:
    """What a plugin returned is what the Protocol says (a bug in it is named
    as its fault, not met later as an internal error)."""
    if not (hasattr(result, "target") and hasattr(result, "image_config")):
        raise UserError(f"frontend {name} returned {type(result).__name__}, not a FrontendResult")
    target, config = result.target, result.image_config
    if target is not None and not isinstance(target, Vertex):
        raise UserError(f"frontend {name}: target is {type(target).__name__}, not a Vertex")
    if not isinstance(config, Mapping):
        raise UserError(f"frontend {name}: image_config is {type(config).__name__}, not a mapping")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise UserError(f"frontend {name}: image_config is not JSON: {exc}") from None
    if not isinstance(config.get("config") or {}, Mapping):
        raise UserError(f"frontend {name}: image_config's config is not an object")
    history = config.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
        raise UserError(f"frontend {name}: image_config's history is not a list of objects")


async def frontend_history(plan: Plan, layers: ChainLayers, top: str | None, name: str) -> Plan:
    """``plan`` with one history entry per layer of the solved chain (the
    frontend's own when it gave exactly that many, else one naming it).

    The chain's pulled layers (at its bottom) are the base image's: their
    entries, and the dated ones after them, stay as given; the entries of the
    graph's own steps are dated by their layers as a Dockerfile build's are, so
    the same graph from either frontend makes the same image."""
    chain = await layers.chain(top)
    given = list(plan.config["history"])
    if sum(1 for h in given if not h.get("empty_layer")) != len(chain):
        given = [{"created_by": name, "comment": "ociworker frontend"} for _ in chain]
        base_n, split = len(chain), len(given)
    else:
        base_n = 0
        while base_n < len(chain) and chain[base_n].startswith(LAYER_SNAPSHOT_PREFIX):
            base_n += 1
        split, seen = 0, 0
        while split < len(given) and seen < base_n:
            seen += not given[split].get("empty_layer")
            split += 1
        while split < len(given) and given[split].get("empty_layer") and "created" in given[split]:
            split += 1
    config = dict(plan.config, history=given)
    return dataclasses.replace(
        plan, config=config, base_history=tuple(given[:split]), base_layers=base_n
    )


async def _layout_images(worker: Worker, req: BuildRequest) -> dict[str, ImageInfo]:
    """The ``oci-layout://`` named contexts' images, imported into the content
    store, by the context's value (what the frontend looks them up by)."""
    out: dict[str, ImageInfo] = {}
    for nc in req.build_contexts:
        if nc.kind != "oci-layout":
            continue
        got = await asyncio.to_thread(
            load_layout_image,
            worker.content,
            Path(nc.value),
            nc.ref,
            worker.config.platform,
            f"--build-context {nc.name}={nc.raw}",
        )
        ref = f"oci-layout/{Path(nc.value).name or 'layout'}@{got.manifest_digest}"
        out[nc.raw] = ImageInfo(ref=ref, config=got.config)
    return out


def named_locals(req: BuildRequest) -> dict[str, object]:
    """The local sources of the build's DIR contexts (``local://named:NAME``)."""
    return {
        nc.local_name: LocalContext(
            Path(nc.value).absolute(), read_dir_ignore(Path(nc.value).absolute())
        )
        for nc in req.build_contexts
        if nc.kind == "local"
    }


def check_dockerfile(
    definition: BuildDefinition,
    req: BuildRequest | None = None,
    bases: Mapping[BaseRef, BaseImage] | None = None,
    platform: str = "",
) -> tuple[str, int]:
    """``build --check``: the report of BuildKit's default lint rules over the
    Dockerfile, and how many warnings it has (nothing is built). ``bases``: the
    base images ``check_bases`` resolved (None: the rules that need them see
    no base's variables and no platform)."""
    parsed = parse(definition.dockerfile, definition.filename)
    warnings = lint(
        parsed,
        bases,
        build_args=req.build_args if req else None,
        platform=platform,
        named=[nc.name for nc in req.build_contexts] if req else (),
        ignore=IgnoreMatcher(definition.ignore_patterns) if definition.ignore_patterns else None,
        source=definition.dockerfile,
    )
    return report(warnings, definition.dockerfile, definition.filename), len(warnings)


def check_base_refs(definition: BuildDefinition, req: BuildRequest, platform: str) -> list[BaseRef]:
    """The base images a check of ``definition`` resolves (what its stages are FROM)."""
    parsed = parse(definition.dockerfile, definition.filename)
    return base_images(parsed, req.build_args, platform, [nc.name for nc in req.build_contexts])


async def check_bases(
    worker: Worker,
    refs: Sequence[BaseRef],
    credentials: Credentials | None = None,
    *,
    pull: bool = False,
) -> dict[BaseRef, BaseImage]:
    """Resolve the check's base images as a build does (the image store, then
    the registry), but take a single-platform image whatever its platform:
    BuildKit's check reports a foreign one (InvalidBaseImagePlatform), where a
    build refuses it. A base that cannot be resolved fails the check, as
    BuildKit's (its error names the image)."""

    async def one(ref: BaseRef) -> BaseImage:
        config = await _check_config(worker, ref, credentials, pull)
        plat = Platform.from_json(config) if config.get("architecture") else None
        rootfs = config.get("rootfs") or {}
        return BaseImage(
            env=tuple(str(e) for e in (config.get("config") or {}).get("Env") or ()),
            platform=str(plat) if plat and plat.os else "",
            layers=bool(rootfs.get("diff_ids")),
        )

    got = await asyncio.gather(*(one(r) for r in refs), return_exceptions=True)
    out: dict[BaseRef, BaseImage] = {}
    for ref, info in zip(refs, got, strict=True):
        if isinstance(info, RegistryError):
            raise RegistryError(
                f"{ref.name}: failed to resolve source metadata for "
                f"{parse_reference(ref.name)}: {info}"
            ) from info
        if isinstance(info, BaseException):
            raise info
        out[ref] = info
    return out


async def _check_config(
    worker: Worker, ref: BaseRef, credentials: Credentials | None, pull: bool
) -> dict[str, Any]:
    parsed = parse_reference(ref.name)
    if parsed.digest is None and not pull:
        local = worker.images.get(str(parsed))
        if local is not None:
            return read_image(worker.content, local.digest)[1]
    registry = worker.registry.with_credentials(credentials)
    desc, data = await registry.fetch_manifest(parsed)
    if desc.media_type in INDEX_TYPES:
        # an index picks the stage's platform (none: the error says which it has)
        want = Platform.parse(ref.platform) if ref.platform else worker.config.platform
        resolved = await registry.resolve(parsed, want, store=worker.content)
        config: dict[str, Any] = json.loads(resolved.config_json)
        return config
    try:
        cdesc = Descriptor.from_json(json.loads(data)["config"])
    except (TypeError, ValueError, KeyError, OciworkerError) as exc:
        raise RegistryError(f"invalid manifest {desc.digest} of {parsed}: {exc}") from None
    if not worker.content.has(cdesc.digest):
        await registry.fetch_blob(parsed, cdesc, worker.content)
    loaded = json.loads(worker.content.read(cdesc.digest))
    if not isinstance(loaded, dict):
        raise RegistryError(f"image config of {parsed} is not a JSON object")
    return loaded


def check_entitlements(
    target: Vertex | None, allowed: tuple[str, ...], requested: tuple[str, ...]
) -> None:
    """Refuse the build before anything runs if a step needs an entitlement the
    worker does not allow or the build did not ask for (as BuildKit validates
    the whole definition first); the first such step is named."""
    seen: set[int] = set()
    todo = [target] if target is not None else []
    found: list[Vertex] = []
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v.op, ExecOp):
            found.append(v)
        todo.extend(i for i in v.inputs if i is not None)
    # The exec handler's own rule (it checks again for any caller, cached or not).
    for v in sorted(found, key=lambda v: v.name):
        exec_entitlements(v, allowed, requested)


async def resolve_image(
    worker: Worker, name: str, credentials: Credentials | None = None, *, pull: bool = False
) -> ImageInfo:
    """Pin a FROM reference to a manifest digest: the image store first, then the
    registry (``pull``: the registry only, as ``--pull``)."""
    ref = parse_reference(name)
    repo = ref.repository
    if ref.digest is None and not pull:
        local = worker.images.get(str(ref))
        if local is not None:
            _, config = read_image(worker.content, local.digest)
            return ImageInfo(ref=f"{repo}@{local.digest}", config=config)
    registry = worker.registry.with_credentials(credentials)
    resolved = await registry.resolve(ref, worker.config.platform, store=worker.content)
    config = json.loads(resolved.config_json)
    return ImageInfo(ref=f"{repo}@{resolved.manifest.digest}", config=config)


#: what a build that exports nothing says (buildx: "No output specified ... Build
#: result will only remain in the build cache")
NO_OUTPUT_WARNING = (
    "No output specified: the build result will only remain in the build cache. "
    "Use -t NAME to keep the image in the image store, or -o type=oci,dest=FILE "
    "to write it to a file"
)


async def build(
    worker: Worker,
    req: BuildRequest,
    definition: BuildDefinition | None,
    events: EventSink = discard,
    *,
    credentials: Credentials | None = None,
    target: ExportTarget | None = None,
    secrets: Secrets | None = None,
    ssh: SSHAgents | None = None,
    prelude: Sequence[Event] = (),
    plan: Plan | None = None,
    local_dirs: Mapping[str, LocalContext] | None = None,
) -> BuildResult:
    """Plan, solve and export ``req``; every output is handed to ``target``
    (default: written to the local filesystem, ``dest=-`` to stdout).
    ``credentials``: the registry credentials the caller lends this build
    (anonymous when None; the CLI passes its docker config); ``secrets`` and
    ``ssh`` serve ``RUN --mount=type=secret|ssh`` (none by default).

    Every build that starts (success or failure) leaves a history record;
    ``prelude``: what the caller showed of it already (a daemon syncing the
    context), recorded with it. ``plan``: a graph made already (``ociworker.graph``)
    instead of a Dockerfile's, with ``local_dirs`` its local sources beside the
    context."""
    check_step_limits(worker, req)
    check_platforms(req.platforms, worker.config.platform)

    async def solve(recorder: BuildRecorder | None) -> BuildResult:
        # under a lease: what the build uses is in use for prune and GC until it ends
        lease = worker.cache.lease()
        try:
            return await _build(
                worker,
                req,
                definition,
                events,
                recorder,
                credentials,
                target,
                secrets,
                ssh,
                plan,
                local_dirs,
            )
        finally:
            worker.cache.release(lease)

    if worker.history is None:
        return await solve(None)
    recorder = BuildRecorder(
        dockerfile="",
        # a URL's credentials never reach the record
        context=redact(req.context_url) if req.context_url else str(req.context),
        target=req.target,
        build_args=req.build_args,
        no_cache=req.no_cache,
        checksums=worker.checksums,
    )
    note = recorder.sink(discard)
    for ev in prelude:
        note(ev)
    error = ""
    result: BuildResult | None = None
    try:
        result = await solve(recorder)
        return result
    except BaseException as exc:
        error = error_line(exc)
        raise
    finally:
        await _record(worker, req, recorder, result, error, events)


async def _record(
    worker: Worker,
    req: BuildRequest,
    recorder: BuildRecorder,
    result: BuildResult | None,
    error: str,
    events: EventSink,
) -> None:
    """Keep the build's record; with ``--explain-cache``, say why each step that
    ran missed (against the closest earlier build of the same Dockerfile and
    target). A history that cannot be written never fails the build."""
    history = worker.history
    assert history is not None
    outputs = {
        k: str(v)
        for k, v in (result.metadata if result else {}).items()
        if k in ("containerimage.digest", "containerimage.config.digest", "image.name")
    }
    try:
        previous = history.previous_of(recorder.dockerfile, recorder.target, recorder.id)
        known = {s.key: s.files for s in previous.steps if s.key} if previous else {}
        record = await recorder.finish(recorder.graph, recorder.job, outputs, error, known)
        reasons = explain(record, previous)
        record = dataclasses.replace(
            record, explain=reasons, compared_with=previous.id if previous else ""
        )
        history.put(record, recorder.events)
    except Exception as exc:  # the build's own outcome stands
        events(Warning(f"build history not recorded: {exc}"))
        return
    if req.explain_cache:
        for line in explain_lines(record):
            events(Info(line))


async def _build(
    worker: Worker,
    req: BuildRequest,
    definition: BuildDefinition | None,
    events: EventSink,
    recorder: BuildRecorder | None,
    credentials: Credentials | None,
    target: ExportTarget | None,
    secrets: Secrets | None,
    ssh: SSHAgents | None,
    plan: Plan | None = None,
    local_dirs: Mapping[str, LocalContext] | None = None,
) -> BuildResult:
    steps: dict[str, dict[str, Any]] = {}
    # --verify-cache's runs are shown, not recorded as the build's own steps
    shown = cap_logs(events, req.log_cap)
    if recorder is not None:
        events = recorder.sink(events)
    events = cap_logs(_collect_usage(events, steps), req.log_cap)
    if target is None:
        target = LocalExportTarget()
    outputs = list(req.outputs)
    # Every output's options are checked before anything runs, whoever made
    # the request (the CLI parsed them already; Python callers and the daemon's
    # clients may not have).
    check_outputs(outputs, req.tags)
    exporters = resolve_outputs(outputs)
    compression = compression_opts([e.layer_options for e in exporters])
    force = force_compression([e.layer_options for e in exporters])
    annotations = parse_annotations(req.annotations)
    if not outputs and not req.tags:
        events(Warning(NO_OUTPUT_WARNING))
    if cgroup_warning := os.environ.get(CGROUP_WARNING):
        # a rootless worker without (all of) a delegated cgroup: said once per
        # build, in the progress stream where -q and rawjson readers expect it
        events(Warning(cgroup_warning))
    credentials = credentials or NoCredentials()
    context_root = req.context.absolute()
    if req.context_url:
        # The worker fetches the context (the client sent none) and, unless
        # the caller read it already (-f -), the Dockerfile in it.
        remote = await open_remote_context(
            req.context_url,
            git=GitFetcher(worker.root / "git", allow_file=worker.config.git_file_urls),
            store=worker.root / "remote-contexts",
            scratch=worker.tmp,
            dockerfile=str(req.dockerfile) if req.dockerfile is not None else None,
            want_definition=definition is None,
            keep_git_dir=req.build_args.get(KEEP_GIT_DIR_ARG, "").lower() in ("1", "true"),
            secrets=secrets if secrets is not None else NoSecrets(),
            ssh=ssh if ssh is not None else NoSSH(),
            events=events,
            # the records ADD URL keeps: a rebuild asks with If-None-Match
            http=HttpFetcher(worker.content, worker.root / "http", None),
        )
        context_root = remote.root
        definition = definition or remote.definition
    if plan is not None:
        if recorder is not None:
            # a graph's builds are compared with the earlier graph builds of
            # the same context (as a Dockerfile's with that file's)
            recorder.dockerfile = f"graph:{context_root}"
        for w in plan.warnings:
            events(Warning(w))
    elif definition is None:
        raise ConfigError("no Dockerfile for this build")
    elif recorder is not None:
        # the same Dockerfile is the same file of the same context (or URL)
        name = str(req.dockerfile or definition.filename)
        recorder.dockerfile = (
            f"{redact(req.context_url)}//{name}" if req.context_url else str(context_root / name)
        )
        # a graph.v1 (or plugin) definition is its bytes; a Dockerfile is its text
        recorder.dockerfile_digest = sha256_bytes(
            definition.source or definition.dockerfile.encode()
        )
    chosen: plugins.Chosen | None = None
    if plan is None:
        assert definition is not None
        chosen = choose_frontend(req, definition)
        if chosen.frontend is None:
            plan = await plan_build(worker, req, definition, events, credentials)
        else:
            plan = await plan_frontend(worker, chosen, req, definition, context_root, events)
    check_entitlements(plan.target, worker.config.entitlements, req.allow)
    layer_options = [e.layer_options for e in exporters]
    compression = with_epoch(compression, layer_options, plan.epoch)
    for w in epoch_warnings(layer_options, plan.epoch):
        events(Warning(w))
    matcher = IgnoreMatcher(definition.ignore_patterns if definition is not None else ())
    parts = _export_parts(worker, target, events, credentials)
    check_cache_specs(req)
    imported = await _import_caches(worker, req, credentials, events)
    # A build whose image only goes to registries leaves an imported cache's
    # blobs where they are: the pushes mount them registry to registry (as
    # BuildKit's lazy refs do), fetching only what a registry cannot mount.
    remote_ok = (
        imported is not None
        and not req.tags
        and not force
        and all(e.runs_last for e in exporters if e.needs_image)
    )
    if imported is not None:
        layers = ImportedLayers(parts.layers, imported, fetch=not remote_ok)
        fetch = imported.fetch_blob if remote_ok else None
        parts = dataclasses.replace(parts, layers=layers, fetch_blob=fetch)

    # solve (the exporters that write while it runs see every result)
    watch = SolveWatch(plan.target, compression, parts)
    for e in exporters:
        e.watch(watch)
    # --verify-cache: each step as shown (in that order), and whether it was CACHED
    steps_shown: dict[str, bool] = {}
    job = Job(
        id=uuid.uuid4().hex,
        events=_noting_steps(events, steps_shown) if req.verify_cache else events,
        no_cache=req.no_cache,
        locals={
            "context": LocalContext(context_root, matcher),
            **named_locals(req),
            **(local_dirs or {}),
        },
        credentials=credentials,
        on_result=watch.on_result if watch.active else None,
        secrets=secrets if secrets is not None else NoSecrets(),
        ssh=ssh if ssh is not None else NoSSH(),
        entitlements=req.allow,
        imported=imported,
    )
    if recorder is not None:
        recorder.graph, recorder.job = plan.target, job
    solving = asyncio.ensure_future(worker.solver.solve(plan.target, job))
    # A layer that cannot be written fails the build now, not when the solve ends.
    watch.on_failure = solving.cancel
    try:
        result = await solving
        if watch.active:
            await watch.wait()
    except BaseException as exc:
        if watch.active:
            await watch.cancel()
            me = asyncio.current_task()
            ours = me is None or me.cancelling() == 0  # not a Ctrl-C of the whole build
            if isinstance(exc, asyncio.CancelledError) and watch.error is not None and ours:
                raise watch.error from None
        raise
    if req.verify_cache:
        # before exporting: a false hit fails the build with nothing written or pushed
        from ociworker.verify import verify_cache

        await verify_cache(
            worker, plan.target, job, shown, steps=steps_shown, epoch=compression.epoch
        )
    if result.kind == REMOTE and any(not e.needs_image for e in exporters):
        # an output of files (local, tar): the imported result is unpacked;
        # image outputs take its blobs as they are
        result = await worker.solver.materialize(result, job)
    top = ImportedLayers.top_name(result)
    cache_inputs = ExportInputs(plan.target, job, result, parts.layers, parts.content, compression)
    inline = [s for s in req.cache_to if s.type == "inline"]

    # export
    need_image = bool(req.tags) or any(e.needs_image for e in exporters) or bool(inline)
    need_image = need_image or req.iidfile is not None or req.metadata_file is not None
    need_image = need_image or req.want_image
    image: ImageResult | None = None
    if need_image and chosen is not None and chosen.frontend is not None:
        plan = await frontend_history(plan, parts.layers, top, chosen.name)
    if need_image:
        with ProgressStep(events, "exporting layers"):
            image = await make_image(
                parts.layers,
                parts.content,
                plan,
                top,
                compression,
                force=force,
                labels=req.labels,
                annotations=annotations,
                remote_ok=remote_ok,
            )
            if inline:
                cache = await collect(cache_inputs, "min", worker.cache.lookup)
                image = await asyncio.to_thread(add_inline_cache, parts.content, image, cache)
        names = [str(parse_reference(t)) for t in req.tags]
        for name in names:
            worker.images.put(name, image.manifest)
    metadata: dict[str, Any] = {}
    if image is not None:
        metadata = {
            "containerimage.digest": image.manifest.digest,
            "containerimage.config.digest": image.config.digest,
            "containerimage.descriptor": image.manifest.to_json(),
        }
        names = all_image_names(outputs, req.tags)
        if names:
            metadata["image.name"] = ",".join(names)
    if steps:
        metadata["ociworker.steps"] = steps
    exported = ExportResult(image, top, tuple(req.tags))
    # pushes last: a registry's refusal leaves every local output written
    for e in sorted(exporters, key=lambda e: e.runs_last):
        await e.export(exported, parts)
    if req.cache_to:
        registry = worker.registry.with_credentials(credentials)
        await export_caches(req.cache_to, cache_inputs, worker.cache.lookup, registry, events)
    if req.iidfile is not None and image is not None:
        with write_errors(f"cannot write --iidfile {req.iidfile}"):
            write_atomic(req.iidfile, image.config.digest.encode())
    if req.metadata_file is not None:
        with write_errors(f"cannot write --metadata-file {req.metadata_file}"):
            write_atomic(req.metadata_file, json.dumps(metadata, indent=2).encode() + b"\n")
    return BuildResult(
        manifest=image.manifest if image else None,
        config_digest=image.config.digest if image else None,
        metadata=metadata,
    )


def check_cache_specs(req: BuildRequest) -> None:
    """Every ``--cache-to``/``--cache-from`` is checked before anything runs,
    whoever made the request."""
    for spec in (*req.cache_to, *req.cache_from):
        spec.check()


async def _import_caches(
    worker: Worker, req: BuildRequest, credentials: Credentials, events: EventSink
) -> CacheImport | None:
    if not req.cache_from or req.no_cache:
        return None
    parts = ImportParts(
        content=worker.content,
        snapshots=worker.snapshots,
        catalog=worker.snapshots,
        applier=worker.applier,
        layers=worker.layers,
    )
    registry = worker.registry.with_credentials(credentials)
    imported = await load_imports(req.cache_from, parts, registry, worker.config.platform, events)
    return None if imported.empty else imported


def _noting_steps(events: EventSink, steps: dict[str, bool]) -> EventSink:
    """``events``, noting each step in ``steps`` as it is first shown, with
    whether it was CACHED (``--verify-cache`` reports in the build's order, and
    words a difference of a step that ran in this build as non-determinism)."""

    def sink(ev: Event) -> None:
        if isinstance(ev, VertexStatus):
            steps[ev.digest] = steps.get(ev.digest, False) or ev.cached
        events(ev)

    return sink


def _collect_usage(events: EventSink, steps: dict[str, dict[str, Any]]) -> EventSink:
    """``events``, noting what each RUN that ran cost in ``steps`` (step name ->
    ``Usage.to_json()``) for the metadata file's ``ociworker.steps``."""

    def sink(ev: Event) -> None:
        if isinstance(ev, VertexStatus) and ev.usage is not None:
            steps[ev.name or ev.digest] = ev.usage.to_json()
        events(ev)

    return sink


def check_step_limits(worker: Worker, req: BuildRequest) -> None:
    """A build may lower the worker's limits, never raise them (``--ulimit nproc``
    is bounded by the step pids limit, ``--shm-size`` by the step memory limit:
    /dev/shm is memory charged to the step)."""
    cfg = worker.config
    for u in req.ulimits:
        if u.name == "nproc" and cfg.step_pids is not None and u.hard > cfg.step_pids:
            raise ConfigError(f"--ulimit {u}: above the worker's step pids limit {cfg.step_pids}")
    mem = cfg.step_memory
    if req.shm_size is not None and mem is not None and req.shm_size > mem:
        raise ConfigError(
            f"--shm-size {req.shm_size}: above the worker's step memory limit {mem} bytes"
        )


def _export_parts(
    worker: Worker, target: ExportTarget, events: EventSink, credentials: Credentials
) -> ExportParts:
    def view(name: str | None) -> contextlib.AbstractAsyncContextManager[Path]:
        return access.view(worker.snapshots, worker.mounter, name, worker.tmp)

    return ExportParts(
        content=worker.content,
        images=worker.images,
        view=view,
        layers=SnapshotLayers(worker.snapshots, worker.comparer, worker.layers, worker.content),
        target=target,
        events=events,
        registry=worker.registry.with_credentials(credentials),
        sources=worker.layers,
    )


# --- du / prune (see ociworker.gc) --------------------------------------------------------


async def disk_usage(worker: Worker, contexts: Path | None = None) -> list[UsageRecord]:
    """Every record of the root (``contexts``: the daemon's synced contexts' dir)."""
    from ociworker import gc

    return await gc.disk_usage_records(worker, contexts)


async def prune(
    worker: Worker, opts: PruneOptions | None = None, contexts: Path | None = None
) -> list[UsageRecord]:
    """Remove what ``opts`` selects (default: everything but internal records)
    and nothing a running build holds; the records removed."""
    from ociworker import gc

    return await gc.prune(worker, opts or PruneOptions(), contexts)


async def collect_garbage(
    worker: Worker,
    policies: Sequence[GCPolicy],
    contexts: Path | None = None,
    *,
    skip_unchanged: bool = False,
) -> list[UsageRecord]:
    """One GC pass of ``policies``; the records removed (see ``gc.collect``)."""
    from ociworker import gc

    return await gc.collect(worker, policies, contexts, skip_unchanged=skip_unchanged)
