"""What the pytest plugin's fixtures drive: builds on an embedded worker or a
daemon, and commands run in the built images.

``build_plan`` maps ``ociworker_build``'s keyword options (buildx's flag names
in snake_case) onto a ``BuildRequest`` with the parsers the CLI uses, so an
option means here what its flag means there; it is pure and unit-tested.
``TestWorker`` runs those requests: on its own embedded worker (a state dir of
its own, in the test session's temp dir), or on the daemon at ``host``. Every
build also writes its image as an OCI archive, which is read back into a
``BuiltImage`` (what a consumer of the image sees, not the worker's records).
``run`` executes a command in an image through the worker's own executor:
the image's layers are extracted (the differ's path-safe applier) into a fresh
directory, which is the rootfs of one sandboxed container.
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ociworker.core.build import (
    BuildRequest,
    NamedContext,
    Ulimit,
    parse_add_host,
    parse_ram_size,
)
from ociworker.core.cacheimport import parse_cache_specs
from ociworker.core.entitlements import parse_entitlements
from ociworker.core.outputs import OutputSpec, parse_labels
from ociworker.errors import BuildFailed, ConfigError, OciworkerError, UserError
from ociworker.testing.image import BuiltImage, RunResult, load_layout, unpack_oci_archive

if TYPE_CHECKING:
    from ociworker.session.secrets import SecretSource
    from ociworker.worker import Worker

#: ``ociworker_build``'s options: buildx's flags in snake_case (a repeatable flag
#: in the plural), and what each takes
BUILD_OPTIONS: Mapping[str, str] = {
    "file": "the Dockerfile's path, relative to the context (--file)",
    "target": "the stage to build (--target)",
    "build_args": "{NAME: VALUE} or ['NAME=VALUE'] (--build-arg)",
    "platform": "'linux/amd64' or a list (--platform)",
    "secrets": "['id=ID,src=PATH' | 'id=ID,env=VAR'] or {ID: VALUE} (--secret)",
    "ssh": "['default' | 'ID=PATH'] (--ssh)",
    "no_cache": "bool (--no-cache)",
    "no_cache_filter": "['STAGE'] (--no-cache-filter)",
    "pull": "bool (--pull)",
    "tags": "['name:tag'] (--tag)",
    "labels": "{KEY: VALUE} (--label)",
    "annotations": "['KEY=VALUE'] (--annotation)",
    "build_contexts": "{NAME: DIR | 'docker-image://REF' | BuiltImage ...} (--build-context)",
    "network": "'default' | 'none' | 'host' (--network)",
    "add_hosts": "{NAME: IP} or ['NAME:IP'] (--add-host)",
    "ulimits": "['nofile=1024:2048'] (--ulimit)",
    "shm_size": "'64m' or bytes (--shm-size)",
    "allow": "['network.host' | 'security.insecure'] (--allow)",
    "cache_from": "['type=...'] (--cache-from)",
    "cache_to": "['type=...'] (--cache-to)",
    "outputs": "['type=...'] more outputs (--output)",
    "push": "bool: push to the ociworker_registry fixture (--push)",
}


def _items(name: str, value: Any) -> list[str]:
    """A repeatable option's values: one string, or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"ociworker_build: {name} takes a string or a list of strings")


def _pairs(name: str, value: Any, sep: str) -> list[str]:
    """A mapping option as ``KEY<sep>VALUE`` strings (a list passes as is)."""
    if isinstance(value, Mapping):
        return [f"{k}{sep}{v}" for k, v in value.items()]
    return _items(name, value)


@dataclass(frozen=True)
class BuildPlan:
    """One ``ociworker_build`` call, in the worker's terms."""

    request: BuildRequest
    secrets: tuple[SecretSource, ...] = ()
    #: the values of secrets given as {ID: VALUE}, served as if from the environment
    secret_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    ssh: tuple[str, ...] = ()
    #: the registry references the image is pushed to
    pushed: tuple[str, ...] = ()


def build_plan(
    context: Path,
    options: Mapping[str, Any],
    *,
    archive: Path,
    push_to: Sequence[str] = (),
    over_daemon: bool = False,
) -> BuildPlan:
    """``options`` (``BUILD_OPTIONS``) as a request that also writes the image
    to the OCI archive ``archive``; ``push_to``: the references ``push=True``
    pushes to (the caller picks them in its registry)."""
    from ociworker.session.secrets import SecretSource

    unknown = sorted(set(options) - set(BUILD_OPTIONS))
    if unknown:
        raise TypeError(
            f"ociworker_build() got unexpected option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(BUILD_OPTIONS)}"
        )
    o = dict(options)
    dockerfile = None
    if o.get("file") is not None:
        f = Path(o["file"])
        dockerfile = f if f.is_absolute() else context / f
    build_args: dict[str, str] = {}
    for item in _pairs("build_args", o.get("build_args"), "="):
        k, eq, v = item.partition("=")
        if not k or not eq:
            raise ConfigError(f"invalid build_args item {item!r}: want NAME=VALUE")
        build_args[k] = v
    contexts: dict[str, NamedContext] = {}
    for name, value in dict(o.get("build_contexts") or {}).items():
        if isinstance(value, BuiltImage):
            # an image of an earlier build: read from its OCI layout, pinned by digest
            text = f"oci-layout://{value.layout}@{value.digest}"
        else:
            text = str(value)
        contexts[name] = NamedContext.parse(f"{name}={text}")
    secret_env: dict[str, str] = {}
    sources: list[SecretSource] = []
    raw_secrets = o.get("secrets")
    if isinstance(raw_secrets, Mapping):
        for sid, value in raw_secrets.items():
            sources.append(SecretSource(str(sid), env=str(sid)))
            secret_env[str(sid)] = str(value)
    else:
        sources = [SecretSource.parse(s) for s in _items("secrets", raw_secrets)]
    outputs = [OutputSpec.parse(x) for x in _items("outputs", o.get("outputs"))]
    outputs.append(OutputSpec("oci", (("dest", str(archive)),)))
    pushed: tuple[str, ...] = ()
    if o.get("push"):
        if not push_to:
            raise ConfigError(
                "push=True needs a registry to push to (the ociworker_registry fixture)"
            )
        pushed = tuple(push_to)
        outputs += [OutputSpec("image", (("name", ref), ("push", "true"))) for ref in pushed]
    shm = o.get("shm_size")
    request = BuildRequest(
        context=context,
        dockerfile=dockerfile,
        tags=tuple(_items("tags", o.get("tags"))),
        build_args=build_args,
        target=str(o.get("target") or ""),
        outputs=tuple(outputs),
        no_cache=bool(o.get("no_cache", False)),
        network=str(o.get("network") or "default"),
        extra_hosts=tuple(parse_add_host(h) for h in _pairs("add_hosts", o.get("add_hosts"), "=")),
        ulimits=tuple(Ulimit.parse(u) for u in _items("ulimits", o.get("ulimits"))),
        shm_size=None if shm is None else shm if isinstance(shm, int) else parse_ram_size(str(shm)),
        allow=parse_entitlements(_items("allow", o.get("allow")), "allow"),
        cache_to=parse_cache_specs(
            _items("cache_to", o.get("cache_to")), export=True, over_daemon=over_daemon
        ),
        cache_from=parse_cache_specs(
            _items("cache_from", o.get("cache_from")), export=False, over_daemon=over_daemon
        ),
        annotations=tuple(_items("annotations", o.get("annotations"))),
        labels=parse_labels(_pairs("labels", o.get("labels"), "=")),
        build_contexts=tuple(contexts.values()),
        platforms=tuple(_items("platform", o.get("platform"))),
        pull=bool(o.get("pull", False)),
        no_cache_filter=tuple(_items("no_cache_filter", o.get("no_cache_filter"))),
    )
    return BuildPlan(
        request, tuple(sources), secret_env, tuple(_items("ssh", o.get("ssh"))), pushed
    )


def merged_env(image_env: Sequence[str], extra: Mapping[str, str]) -> tuple[str, ...]:
    """The image config's ``Env`` with ``extra`` set over it (as ``docker run -e``)."""
    out = {k: v for k, _, v in (e.partition("=") for e in image_env)}
    out.update(extra)
    return tuple(f"{k}={v}" for k, v in out.items())


@dataclass(frozen=True)
class WorkerSettings:
    """How the plugin's worker is made (its command-line and ini options)."""

    runtime: str = "runc"
    #: a daemon's address (``$OCIWORKER_HOST``); None: an embedded worker
    host: str | None = None


class TestWorker:
    """The worker of one test session (one per xdist worker process): an
    embedded worker on ``scratch/root``, or a client of the daemon at
    ``settings.host``. Its event loop is its own (``asyncio.Runner``), so
    fixtures are plain functions a synchronous test calls."""

    __test__ = False  # a class named Test* that pytest must not collect

    def __init__(self, settings: WorkerSettings, scratch: Path) -> None:
        self.settings = settings
        self.scratch = scratch
        self._loop = asyncio.Runner()
        self._worker: Worker | None = None

    @property
    def mode(self) -> str:
        """``embedded`` or ``daemon``."""
        return "daemon" if self.settings.host else "embedded"

    @property
    def root(self) -> Path:
        """The embedded worker's state dir (also the one ``run`` uses with a daemon)."""
        return self.scratch / "root"

    def _call(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run(coro)
        coro.close()
        raise UserError("the ociworker fixtures are synchronous: call them from a non-async test")

    def _embedded(self) -> Worker:
        """The local worker, opened on first use: it builds in embedded mode and
        runs images in both modes."""
        if self._worker is None:
            from ociworker.session.preflight import check_worker_root
            from ociworker.worker import WorkerConfig, open_worker

            check_worker_root(self.root)
            self._worker = open_worker(WorkerConfig(root=self.root, runtime=self.settings.runtime))
        return self._worker

    def check_daemon(self) -> None:
        """Fail now, in words, if the daemon does not answer (not at the first build)."""
        from ociworker.api.client import Client

        async def info() -> None:
            async with Client(self.settings.host) as client:
                await client.info(timeout=30)

        self._call(info())

    def close(self) -> None:
        try:
            if self._worker is not None:
                self._loop.run(self._worker.aclose())
                self._worker = None
        finally:
            self._loop.close()

    def build(self, plan: BuildPlan, archive: Path, layout: Path) -> BuiltImage:
        """Run ``plan`` (its request writes ``archive``) and read the image back."""
        from ociworker.progress_ui import PlainPrinter

        log = io.StringIO()
        printer = PlainPrinter(log)
        try:
            self._call(self._build(plan, printer))
        except OciworkerError as exc:
            raise BuildFailed(f"build failed: {exc}", log.getvalue(), exc) from exc
        unpack_oci_archive(archive, layout)
        return load_layout(layout, runner=self, pushed=plan.pushed)

    async def _build(self, plan: BuildPlan, printer: Any) -> None:
        from ociworker.session.credentials import DockerConfigCredentials
        from ociworker.session.secrets import LocalSecrets

        secrets_ = LocalSecrets(
            list(plan.secrets), {**os.environ, **plan.secret_env} if plan.secret_env else None
        )
        ssh: Any = None
        if plan.ssh:
            from ociworker.session.sshagent import LocalSSHAgents, SSHSource

            ssh = LocalSSHAgents([SSHSource.parse(s) for s in plan.ssh])
        credentials = DockerConfigCredentials()
        if self.settings.host:
            from ociworker.api.client import Client

            async with Client(self.settings.host) as client:
                await client.build(
                    plan.request,
                    events=printer,
                    secrets=secrets_,
                    secret_ids=[s.id for s in plan.secrets],
                    ssh=ssh,
                    ssh_ids=[s.split("=", 1)[0] for s in plan.ssh],
                    credentials=credentials,
                )
            return
        from ociworker import controller
        from ociworker.session.context import read_definition

        req = plan.request
        definition = read_definition(req.context, req.dockerfile)
        await controller.build(
            self._embedded(),
            req,
            definition,
            printer,
            credentials=credentials,
            secrets=secrets_,
            ssh=ssh,
        )

    # -- Runner --------------------------------------------------------------------

    def run(
        self,
        image: BuiltImage,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        user: str | None,
        workdir: str | None,
        network: str,
    ) -> RunResult:
        if network not in ("none", "default", "host"):
            raise ConfigError(f"network={network!r}: want none, default or host")
        result: RunResult = self._call(self._run(image, args, env, user, workdir, network))
        return result

    async def _run(
        self,
        image: BuiltImage,
        args: Sequence[str],
        env: Mapping[str, str],
        user: str | None,
        workdir: str | None,
        network: str,
    ) -> RunResult:
        from ociworker.core.mounts import Mount
        from ociworker.diff.apply import apply_tar_stream
        from ociworker.executor.base import ProcessSpec

        worker = self._embedded()
        config = image.config.get("config") or {}
        self.scratch.mkdir(parents=True, exist_ok=True)
        rootfs = Path(tempfile.mkdtemp(prefix="run-", dir=self.scratch))
        try:
            # mkdtemp's 0700 would lock every user but root out of the image's /
            # (a layer that has a "./" entry sets it as the image says)
            rootfs.chmod(0o755)

            def unpack() -> None:
                for layer in image.layers:
                    with layer.tar_path.open("rb") as f:
                        apply_tar_stream(f, rootfs)

            await asyncio.to_thread(unpack)
            spec = ProcessSpec(
                args=tuple(args),
                env=merged_env(config.get("Env") or (), env),
                cwd=workdir or config.get("WorkingDir") or "/",
                user=(config.get("User") or "") if user is None else user,
                network=network,  # type: ignore[arg-type]  # checked in run()
                limits=worker.config.step_limits(),
            )
            out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

            def sink(stream: str, chunk: bytes) -> None:
                out[stream].extend(chunk)

            code = await worker.executor.run(
                [Mount("bind", str(rootfs), ("rbind", "rw"))], spec, [], sink
            )
        finally:
            await asyncio.to_thread(_remove_rootfs, rootfs)
        return RunResult(
            tuple(args),
            code,
            out["stdout"].decode(errors="replace"),
            out["stderr"].decode(errors="replace"),
        )


def _remove_rootfs(rootfs: Path) -> None:
    # never through a mount the executor failed to take down: rmtree would empty it
    from ociworker.fs.mount import mountpoints_under

    if not mountpoints_under(rootfs):
        shutil.rmtree(rootfs, ignore_errors=True)


def scratch_name() -> str:
    """A name no other build of the session uses."""
    return secrets.token_hex(6)
