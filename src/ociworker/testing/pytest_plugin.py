"""The pytest plugin (entry point ``pytest11: ociworker``): fixtures for other
projects' tests of their images.

- ``ociworker_worker``: the session's worker: embedded, in a state dir under
  the session's temp dir, or the daemon at ``--ociworker-host`` /
  ``$OCIWORKER_HOST`` (builds go there).
- ``ociworker_registry``: a real ``docker-registry`` on a free loopback port.
- ``ociworker_build(context_or_dockerfile_text, **options)``: a build, read
  back as a ``BuiltImage``.
- ``ociworker_base_image``: the reference of a busybox-static image in that
  registry, made from the host's ``busybox`` (no Docker Hub).

Each xdist worker process is a session of its own: its own worker state dir,
registry (port picked by the kernel) and temp dirs, so nothing is shared.
Loaded by every pytest run in an environment where ociworker is installed, so
this module imports only pytest and the standard library; the rest loads when
a fixture is first used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ociworker.testing.harness import TestWorker
    from ociworker.testing.image import BuiltImage
    from ociworker.testing.registry_server import RegistryServer

RUNTIMES = ("runc", "crun")
#: the session's worker, once ``ociworker_worker`` has made it (it runs pulled images)
_WORKER = pytest.StashKey["TestWorker"]()
_HINT = "(pass --ociworker-skip-missing to skip such tests instead)"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ociworker", "ociworker image builds")
    group.addoption(
        "--ociworker-runtime",
        choices=RUNTIMES,
        default=None,
        help="OCI runtime of the embedded worker (default: ini ociworker_runtime, else runc)",
    )
    group.addoption(
        "--ociworker-host",
        default=None,
        metavar="ADDR",
        help="build on the ociworker daemon at ADDR (default: ini ociworker_host, "
        "else $OCIWORKER_HOST, else an embedded worker)",
    )
    group.addoption(
        "--ociworker-skip-missing",
        action="store_true",
        default=None,
        help="skip, rather than error, tests whose fixtures need a missing tool "
        "(root, runc/crun, docker-registry, busybox)",
    )
    parser.addini("ociworker_runtime", "OCI runtime of the embedded worker: runc or crun")
    parser.addini("ociworker_host", "address of an ociworker daemon to build on")
    parser.addini(
        "ociworker_skip_missing", "skip tests whose fixtures need a missing tool", type="bool"
    )


def _setting(config: pytest.Config, name: str) -> Any:
    value = config.getoption(f"--ociworker-{name.replace('_', '-')}")
    if value is None:
        value = config.getini(f"ociworker_{name}") or None
    return value


def _missing(config: pytest.Config, what: str) -> None:
    """A tool a fixture needs is not there: an error (a CI that runs nothing must
    not pass), or a skip where the user asked for that."""
    if _setting(config, "skip_missing"):
        pytest.skip(what)
    pytest.fail(f"{what} {_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def ociworker_worker(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestWorker]:
    """The session's worker: an embedded one in a temp state dir, or the daemon at
    ``--ociworker-host`` / ``ociworker_host`` / ``$OCIWORKER_HOST``."""
    from ociworker.testing.harness import TestWorker, WorkerSettings

    runtime = str(_setting(pytestconfig, "runtime") or "runc")
    if runtime not in RUNTIMES:
        raise pytest.UsageError(f"ociworker_runtime = {runtime!r}: want one of {RUNTIMES}")
    host = _setting(pytestconfig, "host") or os.environ.get("OCIWORKER_HOST") or None
    if host is None:
        # the embedded worker mounts, makes namespaces and runs runc/crun: root's work
        if os.geteuid() != 0:
            _missing(pytestconfig, "the embedded ociworker worker needs root")
        if shutil.which(runtime) is None:
            _missing(pytestconfig, f"the OCI runtime {runtime} is not installed")
    worker = TestWorker(WorkerSettings(runtime, host), tmp_path_factory.mktemp("ociworker"))
    if host is not None:
        from ociworker.errors import OciworkerError

        unreachable = ""
        try:
            worker.check_daemon()
        except OciworkerError as exc:
            unreachable = str(exc)
        if unreachable:
            worker.close()
            pytest.fail(f"ociworker_worker: {unreachable}", pytrace=False)
    pytestconfig.stash[_WORKER] = worker
    try:
        yield worker
    finally:
        del pytestconfig.stash[_WORKER]
        worker.close()


@pytest.fixture(scope="session")
def ociworker_registry(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    """A real ``docker-registry`` on 127.0.0.1 and a free port, for this session
    (needs no root nor worker: a pulled image runs once ``ociworker_worker`` is up)."""
    from ociworker.testing.registry_server import REGISTRY_BIN, RegistryServer

    binary = shutil.which("docker-registry") or REGISTRY_BIN
    if not os.access(binary, os.X_OK):
        _missing(
            pytestconfig, "docker-registry is not installed (Debian: apt install docker-registry)"
        )
    server = RegistryServer.start(tmp_path_factory.mktemp("registry"), binary=binary)
    try:
        yield Registry(server, pytestconfig, tmp_path_factory)
    finally:
        server.stop()


class Registry:
    """``ociworker_registry``: the server, with push and pull of whole images."""

    def __init__(
        self, server: RegistryServer, config: pytest.Config, tmp: pytest.TempPathFactory
    ) -> None:
        self.server = server
        self._config = config
        self._tmp = tmp

    @property
    def addr(self) -> str:
        """``127.0.0.1:PORT``."""
        return self.server.addr

    def ref(self, name: str, tag: str = "latest") -> str:
        """``127.0.0.1:PORT/name:tag``."""
        return self.server.ref(name, tag)

    def push(self, image: BuiltImage, ref: str) -> str:
        """Push ``image`` as ``ref`` (of this registry); the manifest digest."""
        return self.server.push(image, ref)

    def pull(self, ref: str) -> BuiltImage:
        """The image ``ref`` as the registry serves it (it can ``run`` when the
        test also has ``ociworker_worker`` or ``ociworker_build``)."""
        import dataclasses

        image = self.server.pull(ref, self._tmp.mktemp("pulled") / "layout")
        return dataclasses.replace(image, runner=self._config.stash.get(_WORKER, None))

    def tags(self, name: str) -> list[str]:
        """The tags of repository ``name``, sorted ([] when there is none)."""
        return self.server.tags(name)

    def manifest(self, ref: str) -> dict[str, Any]:
        """The manifest the registry serves for ``ref`` (a tag or ``@sha256:...``)."""
        return self.server.manifest(ref)


def _write_files(context: Path, files: Mapping[str, str | bytes]) -> None:
    for name, content in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"files: {name!r} must be a relative path inside the context")
        path = context.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


@pytest.fixture
def ociworker_build(
    request: pytest.FixtureRequest,
    ociworker_worker: TestWorker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., BuiltImage]:
    """``ociworker_build(context_or_dockerfile_text, *, files=None, **options)``:
    build and return the image. The first argument is a context directory (a
    ``Path``, or a string naming an existing directory) holding its Dockerfile,
    or else the Dockerfile's text, built in an empty context (``files``:
    {relative path: text or bytes} written into it). ``options`` are buildx's
    flags in snake_case (``harness.BUILD_OPTIONS``); ``push=True`` pushes to
    ``ociworker_registry`` (under each tag's name there, else a fresh name). A
    failed build raises ``ociworker.errors.BuildFailed`` with its log."""
    from ociworker.testing.harness import build_plan

    def build(
        context_or_dockerfile: str | os.PathLike[str],
        /,
        *,
        files: Mapping[str, str | bytes] | None = None,
        **options: Any,
    ) -> BuiltImage:
        work = tmp_path_factory.mktemp("build")
        if isinstance(context_or_dockerfile, os.PathLike) or (
            "\n" not in context_or_dockerfile and Path(context_or_dockerfile).is_dir()
        ):
            context = Path(context_or_dockerfile).absolute()
            if not context.is_dir():
                raise ValueError(f"build context {context} is not a directory")
            if files:
                raise ValueError("files= goes with Dockerfile text, not a context directory")
        else:
            context = work / "context"
            context.mkdir()
            _write_files(context, files or {})
            (context / "Dockerfile").write_text(context_or_dockerfile)
        push_to: list[str] = []
        if options.get("push"):
            registry: Registry = request.getfixturevalue("ociworker_registry")
            push_to = _push_refs(registry, options.get("tags"))
        archive = work / "image.oci.tar"
        plan = build_plan(
            context,
            options,
            archive=archive,
            push_to=push_to,
            over_daemon=ociworker_worker.mode == "daemon",
        )
        return ociworker_worker.build(plan, archive, work / "layout")

    return build


def _push_refs(registry: Registry, tags: Any) -> list[str]:
    """Where ``push=True`` sends the image: each tag's ``name:tag`` in the
    registry fixture (whatever registry the tag named), else a fresh name."""
    from ociworker.core.reference import DEFAULT_DOMAIN, parse_reference
    from ociworker.testing.harness import scratch_name

    refs = []
    for tag in [tags] if isinstance(tags, str) else list(tags or []):
        ref = parse_reference(tag)
        name = ref.familiar_name() if ref.domain == DEFAULT_DOMAIN else ref.path
        refs.append(registry.ref(name, ref.tag or "latest"))
    return refs or [registry.ref("ociworker-pytest", scratch_name())]


@pytest.fixture(scope="session")
def ociworker_base_image(
    pytestconfig: pytest.Config,
    tmp_path_factory: pytest.TempPathFactory,
    ociworker_registry: Registry,
) -> str:
    """``REGISTRY/busybox:latest`` in ``ociworker_registry``: one layer made from the
    host's static ``busybox`` (its applets as links, ``/etc/passwd`` with root,
    user 1000 and nobody), for ``FROM`` lines that need no Docker Hub."""
    from ociworker.testing.busybox import busybox_image, host_arch, write_layout
    from ociworker.testing.image import load_layout

    found = shutil.which("busybox") or "/bin/busybox"
    if not os.access(found, os.X_OK):
        _missing(pytestconfig, "busybox is not installed (Debian: apt install busybox-static)")
    arch = host_arch()
    layout = tmp_path_factory.mktemp("base") / "layout"
    write_layout(busybox_image(Path(found), arch), layout, "latest", arch)
    ref = ociworker_registry.ref("busybox", "latest")
    ociworker_registry.push(load_layout(layout), ref)
    return ref
