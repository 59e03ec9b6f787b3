"""Benchmark ociworker against BuildKit (dockerd's builder) and buildah on ../shared/bench.

The cases are ../shared/bench's and ours in benchmarks/cases/ (debian: a real-world two-stage
build on a debootstrapped base). For every case the tools take turns (interleaved, so a noisy
minute hurts all of them alike); repeat k starts at tool k mod n (the order rotates, so no
tool always follows the big writer), and dirty pages are flushed (sync) before each timed build.
Phases:
  cold         empty build cache, base image already pulled
  warm         unchanged rebuild
  incremental  (context case only) one context file changed, rebuild
  import       (with --registry-cache) a fresh worker rebuilds from the registry cache of
               the case's build: ociworker --cache-to/--cache-from type=registry,mode=max,
               BuildKit (dockerd's builder, which exports inline caches only) an image built
               with BUILDKIT_INLINE_CACHE=1 and pushed, then --cache-from it after
               `docker builder prune -af` and removing the images; the export is not timed
Each tool keeps all its state in the run's work dir: ociworker a fresh --root, BuildKit a
dockerd of its own (own data root and socket, no iptables, no bridge), buildah its own
--root/--runroot and TMPDIR. Every tool leaves the image in its local store (--output store:
docker's image store, containers-storage, ociworker's image store: what each keeps there,
e.g. compressed blobs where the peers keep unpacked layers, is part of its time) or, with
--output docker-archive, also as a `docker save`-format tar (ociworker -o type=docker,
`docker save`, `buildah push docker-archive:`), timed with the build.
Times are wall-clock seconds of the build command(s) alone; the median over --repeat runs is
reported, with each of ours divided by the fastest peer (BuildKit or buildah) on that row and
by each peer. A tool that fails is reported as failed, never fatal. Table on stdout; the raw
results and the table's rows as JSON in --out.

Run as root through benchmarks/run (which prepares the host first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import site
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, cast

from ociworker.testing.daemon import DaemonStartError, spawn_daemon

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_BENCH_DIR = REPO.parent / "shared" / "bench"
#: our own cases (benchmarks/cases/), loaded next to the shared ones
OWN_CASES_DIR = REPO / "benchmarks" / "cases"
DEFAULT_BASE = "127.0.0.1:5000/busybox:latest"
#: the debian case's base (scripts/make-debian-base pushes it; benchmarks/run makes sure)
DEFAULT_DEBIAN_BASE = "127.0.0.1:5000/debian:bookworm"
ALL_CASES = ("steps", "fanout", "layer-export", "cachemount", "context", "debian")
#: the tools ours are compared with; a ratio's denominator is the fastest of them
PEERS = ("buildkit", "buildah")
ALL_TOOLS = (
    "ociworker", "ociworkerd", "buildkit", "buildah", "ociworker-rootless", "buildah-rootless",
)  # fmt: skip
OURS = ("ociworker", "ociworkerd", "ociworker-rootless")
#: the user the rootless tools build as (scripts/setup-host makes it, with its subuid range)
BENCH_USER = os.environ.get("OCIWORKER_BENCH_USER", "ociw-test")
PHASES = ("cold", "warm", "incremental", "import")
DOCKER = "/usr/bin/docker"
RUNC = "/usr/bin/runc"

# The context case's generated tree: ~3,000 files, ~120 MiB, incompressible, reproducible.
CONTEXT_DIRS = 30
CONTEXT_FILES_PER_DIR = 100
CONTEXT_BYTES = 120 * 1024 * 1024


class ToolError(Exception):
    """A tool's command failed; the message carries the tail of its log."""


@dataclass(frozen=True)
class Case:
    name: str
    dockerfile: Path
    context: Path
    phases: tuple[str, ...]
    #: the image its Dockerfile's ``ARG BASE`` gets, pulled before the cold build
    base: str = DEFAULT_BASE


@dataclass(frozen=True)
class Result:
    tool: str
    case: str
    phase: str
    seconds: float | None
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    base: str
    work: Path
    logs: Path
    timeout: float
    env: dict[str, str] = field(default_factory=dict)
    #: ociworker's RUN network: host (as the other tools are run) or default
    network: str = "host"
    #: what every tool leaves behind: "store" (an image in its local store: docker's
    #: image store, containers-storage, ociworker's image store) or "docker-archive" (that
    #: image also written as a `docker save` tar, as the issue's figures were measured)
    output: str = "store"
    #: names this run's cache refs in the registry (a rerun never finds an old cache)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def cache_ref(self, tool: str, case: str) -> str:
        host = self.base.split("/", 1)[0]
        return f"{host}/ociworker-bench-cache/{tool}-{case}:{self.run_id}"

    def archive(self, tool: str, case: str) -> Path:
        """Where ``tool`` writes ``case``'s docker archive (output docker-archive)."""
        folder = self.work / "archives"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o1777)  # the rootless tools write theirs as BENCH_USER
        return folder / f"{tool}-{case}.tar"


def _network_flags(network: str) -> list[str]:
    # host is an entitlement: the embedded worker allows it, the build must ask
    return [f"--network={network}"] + (["--allow=network.host"] if network == "host" else [])


class Tool(Protocol):
    name: str

    def start(self) -> None: ...

    def reset(self, case: Case) -> None:
        """Bring the tool to the cold state for ``case``: no build cache, base image kept."""

    def build(self, case: Case, log: Path) -> None: ...

    def stop(self) -> None: ...


class CacheTool(Tool, Protocol):
    """A tool measured in the ``import`` phase."""

    def export_cache(self, case: Case, log: Path) -> None:
        """Build ``case`` and leave its cache in the registry (not timed)."""

    def build_from_cache(self, case: Case, log: Path) -> None:
        """Build ``case`` importing that cache (timed, after ``reset``)."""


def run(
    argv: Sequence[str],
    log: Path,
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ToolError(f"{argv[0]} timed out after {timeout:.0f}s (log {log})") from None
        except OSError as exc:
            raise ToolError(f"{argv[0]}: {exc}") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise ToolError(f"{argv[0]} exited {proc.returncode} (log {log}): " + " | ".join(tail))


def mounts_under(root: Path) -> list[Path]:
    root = root.resolve()
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = Path(line.split(" ")[4].replace("\\040", " "))
            if point == root or root in point.parents:
                points.append(point)
    return sorted(points, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """rmtree that first detaches mounts left below ``path`` (rmtree would cross into them)."""
    for point in mounts_under(path):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)
    if path.exists():
        shutil.rmtree(path)


# --- ociworker -----------------------------------------------------------------------------


class Ociworker:
    name = "ociworker"

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.exe = REPO / ".venv" / "bin" / "ociworker"
        self.root = s.work / "ociworker-root"
        self.prime = s.work / "ociworker-prime"

    def _build(self, base: str, *args: str) -> list[str]:
        head = [str(self.exe), "build", f"--root={self.root}", "--progress=plain"]
        return [*head, *_network_flags(self.s.network), f"--build-arg=BASE={base}", *args]

    def _output(self, case: Case) -> list[str]:
        tag = f"bench-{case.name}:latest"
        if self.s.output == "docker-archive":
            dest = self.s.archive(self.name, case.name)
            # the tag names the archive's image (RepoTags), as `docker save` of it would
            return ["-t", tag, f"--output=type=docker,dest={dest}"]
        return ["-t", tag]

    def start(self) -> None:
        run([str(self.exe), "build", "--help"], self.s.logs / "ociworker-start.log", timeout=60)
        self.prime.mkdir(parents=True, exist_ok=True)
        (self.prime / "Dockerfile").write_text("ARG BASE\nFROM $BASE\nRUN true\n")

    def reset(self, case: Case) -> None:
        # A fresh state dir is the only cold state every CLI version offers; the priming
        # build puts the base image back so "cold" does not pay for the pull.
        remove_tree(self.root)
        log = self.s.logs / f"ociworker-{case.name}-prime.log"
        run(self._build(case.base, str(self.prime)), log, timeout=self.s.timeout)

    def build(self, case: Case, log: Path) -> None:
        argv = self._build(case.base, "-f", str(case.dockerfile), *self._output(case))
        run([*argv, str(case.context)], log, timeout=self.s.timeout)

    def stop(self) -> None:
        remove_tree(self.root)

    def export_cache(self, case: Case, log: Path) -> None:
        ref = self.s.cache_ref(self.name, case.name)
        cache = f"--cache-to=type=registry,ref={ref},mode=max"
        run(
            self._build(case.base, "-f", str(case.dockerfile), cache, str(case.context)),
            log,
            timeout=self.s.timeout,
        )

    def build_from_cache(self, case: Case, log: Path) -> None:
        ref = self.s.cache_ref(self.name, case.name)
        argv = self._build(case.base, "-f", str(case.dockerfile), *self._output(case))
        argv += [f"--cache-from=type=registry,ref={ref}", str(case.context)]
        run(argv, log, timeout=self.s.timeout)


class OciworkerDaemon(Ociworker):
    """``ociworker serve`` on a socket of its own; every build is a CLI client with
    ``--addr`` (what a build host with a long-lived worker runs)."""

    name = "ociworkerd"

    def __init__(self, s: Settings) -> None:
        super().__init__(s)
        self.root = s.work / "ociworkerd-root"
        self.prime = s.work / "ociworkerd-prime"
        self.sock = s.work / "owd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _build(self, base: str, *args: str) -> list[str]:
        head = [str(self.exe), "build", f"--addr=unix://{self.sock}", "--progress=plain"]
        return [*head, *_network_flags(self.s.network), f"--build-arg=BASE={base}", *args]

    def _serve(self) -> None:
        self.starts += 1
        # The other tools run their steps on the host's network: the daemon must
        # grant that entitlement for the builds' --allow to work (as buildkitd's
        # insecure-entitlements).
        config = self.s.work / "ociworkerd.toml"
        config.write_text('entitlements = ["network.host"]\n')
        args = (f"--addr=unix://{self.sock}", f"--root={self.root}", f"--config={config}")
        try:
            self.proc = spawn_daemon(args, self.s.logs / f"ociworkerd-serve-{self.starts}.log")
        except DaemonStartError as exc:
            raise ToolError(str(exc)) from None

    def _shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.proc = None

    def start(self) -> None:
        super().start()
        self._serve()

    def reset(self, case: Case) -> None:
        # cold = a fresh root, so the daemon restarts on an empty one
        self._shutdown()
        remove_tree(self.root)
        self._serve()
        log = self.s.logs / f"ociworkerd-{case.name}-prime.log"
        run(self._build(case.base, str(self.prime)), log, timeout=self.s.timeout)

    def stop(self) -> None:
        self._shutdown()
        remove_tree(self.root)


# --- BuildKit through its own dockerd --------------------------------------------------------


class BuildKit:
    name = "buildkit"

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.dir = s.work / "dockerd"
        self.sock = self.dir / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {"DOCKER_BUILDKIT": "1", "DOCKER_CONFIG": str(self.dir / "client")}
        self.pulled: set[str] = set()

    def docker(self, *args: str) -> list[str]:
        return [DOCKER, "-H", f"unix://{self.sock}", *args]

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = (self.s.logs / "dockerd.log").open("ab")
        # Own data/exec roots and containerd namespace: nothing shared with a system dockerd.
        self.proc = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={self.dir / 'data'}",
                f"--exec-root={self.dir / 'exec'}",
                f"--pidfile={self.dir / 'dockerd.pid'}",
                f"--host=unix://{self.sock}",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--containerd-namespace=ociworker-bench",
                "--containerd-plugins-namespace=ociworker-bench-plugins",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ToolError(f"dockerd exited {self.proc.returncode} (log dockerd.log)")
            ok = subprocess.run(self.docker("version"), capture_output=True, check=False)
            if ok.returncode == 0:
                break
            time.sleep(0.3)
        else:
            raise ToolError("dockerd did not answer within 60s (log dockerd.log)")
        self._pull(self.s.base)

    def _pull(self, base: str) -> None:
        # 127.0.0.0/8 is an insecure registry to dockerd by default: plain HTTP works
        if base not in self.pulled:
            log = self.s.logs / "buildkit-pull.log"
            run(self.docker("pull", "-q", base), log, timeout=self.s.timeout, env=self.env)
            self.pulled.add(base)

    def reset(self, case: Case) -> None:
        self._pull(case.base)
        log = self.s.logs / f"buildkit-{case.name}-reset.log"
        with contextlib.suppress(ToolError):  # absent on the first round
            run(self.docker("rmi", "-f", f"bench-{case.name}:latest"), log, timeout=120)
        run(self.docker("builder", "prune", "-af"), log, timeout=600, env=self.env)

    def build(self, case: Case, log: Path, *extra: str, save: bool = True) -> None:
        tag = f"bench-{case.name}:latest"
        argv = self.docker("build", "--network=host", "--progress=plain")
        argv += ["--build-arg", f"BASE={case.base}", "-f", str(case.dockerfile), *extra]
        argv += ["-t", tag, str(case.context)]
        run(argv, log, timeout=self.s.timeout, env=self.env)
        if self.s.output == "docker-archive" and save:
            # dockerd's builder has no docker-archive output: the image it stored, saved
            dest = self.s.archive(self.name, case.name)
            run(self.docker("save", "-o", str(dest), tag), log, timeout=self.s.timeout)

    def export_cache(self, case: Case, log: Path) -> None:
        # dockerd's builder (docker driver) exports inline caches only: the image is the cache
        image = self.s.cache_ref(self.name, case.name)
        self.build(case, log, "--build-arg", "BUILDKIT_INLINE_CACHE=1", "-t", image, save=False)
        run(self.docker("push", "-q", image), log, timeout=self.s.timeout, env=self.env)
        # the cache must come from the registry, not from the local image store
        run(self.docker("rmi", "-f", image), log, timeout=120, env=self.env)

    def build_from_cache(self, case: Case, log: Path) -> None:
        self.build(case, log, "--cache-from", self.s.cache_ref(self.name, case.name))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # terminate -> wait -> kill, so containerd and its shims go down with it.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        remove_tree(self.dir)


class _AsUser:
    """Runs a tool's commands as ``BENCH_USER`` in a dir of its own (HOME,
    XDG_RUNTIME_DIR), as that user would: ``runuser`` with a clean environment."""

    def __init__(self, s: Settings, name: str, path: str = "") -> None:
        pw = pwd.getpwnam(BENCH_USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.home = s.work / name
        self.path = path
        # the work dir is made 0700; the user must reach its own dir and the contexts
        s.work.chmod(0o711)
        (self.home / "run").mkdir(parents=True, exist_ok=True)
        (self.home / "run").chmod(0o700)
        for d in [self.home, *self.home.rglob("*")]:
            os.lchown(d, self.uid, self.gid)

    def wrap(self, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        pairs = {
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.home / "run"),
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            **({"PYTHONPATH": self.path} if self.path else {}),
            **(env or {}),
        }
        return ["runuser", "-u", BENCH_USER, "--", "env", "-i"] + [
            f"{k}={v}" for k, v in pairs.items()
        ] + list(argv)  # fmt: skip


def _user_python() -> tuple[str, str]:
    """An interpreter ``BENCH_USER`` can run with this checkout's source and the
    venv's packages (a venv made from a Python under /root is out of its reach)."""
    path = os.pathsep.join([str(REPO / "src"), *site.getsitepackages()])
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/{minor}"):
        probe = ["runuser", "-u", BENCH_USER, "--", "env", f"PYTHONPATH={path}", exe, "-c", "1"]
        if subprocess.run(probe, capture_output=True, check=False, cwd="/").returncode == 0:
            return exe, path
    raise ToolError(f"no Python that {BENCH_USER} can run")


class OciworkerRootless(Ociworker):
    """The embedded worker run by ``BENCH_USER`` (rootless: its own user namespace)."""

    name = "ociworker-rootless"

    def __init__(self, s: Settings) -> None:
        super().__init__(s)
        self.user: _AsUser | None = None
        self.python = ""
        self.root = s.work / self.name / "state"
        self.prime = s.work / self.name / "prime"

    def _build(self, *args: str) -> list[str]:
        assert self.user is not None
        return self.user.wrap([self.python, "-m", "ociworker", *super()._build(*args)[1:]])

    def start(self) -> None:
        try:
            self.python, path = _user_python()
            self.user = _AsUser(self.s, self.name, path)
        except KeyError:
            raise ToolError(f"no user {BENCH_USER} (scripts/setup-host makes it)") from None
        self.prime.mkdir(parents=True, exist_ok=True)
        (self.prime / "Dockerfile").write_text("ARG BASE\nFROM $BASE\nRUN true\n")
        run(self._build(self.s.base, "--help"), self.s.logs / f"{self.name}-start.log", timeout=60)


# --- buildah -------------------------------------------------------------------------------


class Buildah:
    name = "buildah"

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.dir = s.work / "buildah"
        # buildah keeps RUN --mount=type=cache data under $TMPDIR; point it into the work dir.
        self.env = {"TMPDIR": str(self.dir / "tmp")}
        self.pulled: set[str] = set()

    def buildah(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.dir / "root"),
            "--runroot",
            str(self.dir / "run"),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def start(self) -> None:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        self._pull(self.s.base)

    def _pull(self, base: str) -> None:
        if base not in self.pulled:
            argv = self.buildah("pull", "-q", "--tls-verify=false", base)
            log = self.s.logs / f"{self.name}-pull.log"
            run(argv, log, timeout=self.s.timeout, env=self.env)
            self.pulled.add(base)

    def reset(self, case: Case) -> None:
        self._pull(case.base)
        log = self.s.logs / f"{self.name}-{case.name}-reset.log"
        with contextlib.suppress(ToolError):  # absent on the first round
            run(self.buildah("rmi", "-f", f"localhost/bench-{case.name}:latest"), log, timeout=120)
        # --layers leaves its cache as dangling intermediate images; the base stays tagged.
        run(self.buildah("rmi", "--prune"), log, timeout=600, env=self.env)
        for cache in (self.dir / "tmp").glob("buildah-cache-*"):
            shutil.rmtree(cache)

    def build(self, case: Case, log: Path) -> None:
        argv = self.buildah("bud", "--layers", "--runtime", RUNC, "--tls-verify=false")
        tag = f"localhost/bench-{case.name}:latest"
        argv += ["--network", "host", "--build-arg", f"BASE={case.base}"]
        argv += ["-f", str(case.dockerfile), "-t", tag, str(case.context)]
        run(argv, log, timeout=self.s.timeout, env=self.env)
        if self.s.output == "docker-archive":
            dest = self.s.archive(self.name, case.name)
            dest.unlink(missing_ok=True)  # buildah push refuses to overwrite an archive
            tar = f"docker-archive:{dest}:bench-{case.name}:latest"
            run(self.buildah("push", "-q", tag, tar), log, timeout=self.s.timeout, env=self.env)

    def stop(self) -> None:
        with contextlib.suppress(ToolError):
            run(self.buildah("rm", "--all"), self.s.logs / "buildah-stop.log", timeout=120)
        remove_tree(self.dir)


class BuildahRootless(Buildah):
    """``buildah bud`` run by ``BENCH_USER`` (rootless buildah: its own user namespace)."""

    name = "buildah-rootless"

    def __init__(self, s: Settings) -> None:
        super().__init__(s)
        self.dir = s.work / self.name / "buildah"
        self.env = {"TMPDIR": str(self.dir / "tmp")}
        self.user: _AsUser | None = None

    def buildah(self, *args: str) -> list[str]:
        assert self.user is not None
        return self.user.wrap(super().buildah(*args), self.env)

    def start(self) -> None:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        try:
            self.user = _AsUser(self.s, self.name)
        except KeyError:
            raise ToolError(f"no user {BENCH_USER} (scripts/setup-host makes it)") from None
        super().start()

    def stop(self) -> None:
        with contextlib.suppress(ToolError):
            run(self.buildah("rm", "--all"), self.s.logs / f"{self.name}-stop.log", timeout=120)
        # buildah's rootless layers belong to the user's subordinate ids: removed
        # from inside its namespace (buildah unshare), then the rest as root
        with contextlib.suppress(ToolError):
            assert self.user is not None
            argv = self.user.wrap(["buildah", "unshare", "rm", "-rf", str(self.dir)])
            run(argv, self.s.logs / f"{self.name}-stop.log", timeout=600)
        remove_tree(self.dir)


TOOL_TYPES: dict[str, type[Ociworker] | type[BuildKit] | type[Buildah]] = {
    "ociworker": Ociworker,
    "ociworkerd": OciworkerDaemon,
    "buildkit": BuildKit,
    "buildah": Buildah,
    "ociworker-rootless": OciworkerRootless,
    "buildah-rootless": BuildahRootless,
}


# --- cases ---------------------------------------------------------------------------------


def generate_context(
    dest: Path,
    *,
    dirs: int = CONTEXT_DIRS,
    files_per_dir: int = CONTEXT_FILES_PER_DIR,
    total_bytes: int = CONTEXT_BYTES,
    seed: int = 1,
) -> None:
    """Write a reproducible tree of random (incompressible) files of varied sizes."""
    rng = random.Random(seed)
    count = dirs * files_per_dir
    weights = [rng.uniform(0.2, 1.8) for _ in range(count)]
    scale = total_bytes / sum(weights)
    sizes = [int(w * scale) for w in weights]
    sizes[-1] += total_bytes - sum(sizes)
    for i, size in enumerate(sizes):
        path = dest / f"d{i // files_per_dir:02d}" / f"f{i % files_per_dir:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))


def touch_one_file(context: Path, generation: int) -> None:
    """The incremental change: rewrite one small file with new content."""
    (context / "d00" / "changed.txt").write_text(f"generation {generation}\n")


def load_cases(
    bench_dirs: Sequence[Path],
    names: Sequence[str],
    work: Path,
    *,
    registry_cache: bool = False,
    base: str = DEFAULT_BASE,
    bases: Mapping[str, str] | None = None,
) -> list[Case]:
    """The cases, each from the first of ``bench_dirs`` that has it; a case's base is
    ``bases[name]`` if given, else ``base``. With ``registry_cache`` each also has the
    ``import`` phase."""
    more = ("import",) if registry_cache else ()
    cases = []
    for name in names:
        found = [d / name / "Dockerfile" for d in bench_dirs if (d / name / "Dockerfile").is_file()]
        if not found:
            where = ", ".join(str(d) for d in bench_dirs)
            raise SystemExit(f"no benchmark case {name!r}: no {name}/Dockerfile in {where}")
        dockerfile = found[0]
        case_base = (bases or {}).get(name, base)
        if name == "context":
            # Dockerfile stays in the read-only shared dir; the generated tree is the context.
            ctx = work / "context"
            generate_context(ctx)
            touch_one_file(ctx, 0)
            phases = ("cold", "warm", "incremental", *more)
            cases.append(Case(name, dockerfile, ctx, phases, case_base))
        else:
            phases = ("cold", "warm", *more)
            cases.append(Case(name, dockerfile, dockerfile.parent, phases, case_base))
    return cases


# --- running and reporting -----------------------------------------------------------------


def run_case(
    tool: Tool,
    case: Case,
    logs: Path,
    rep: int,
    counter: Iterator[int],
    flush: Callable[[], None] = os.sync,
) -> list[Result]:
    """Run ``case``'s phases with ``tool``; ``flush`` runs before each timed build, outside
    the timing, so a tool does not pay for the writeback of the build before it."""
    results = []
    for phase in case.phases:
        measured = phase == "import" and hasattr(tool, "build_from_cache")
        cache_tool = cast("CacheTool", tool) if measured else None
        if phase == "import" and cache_tool is None:
            continue  # not measured for this tool (buildah)
        try:
            log = logs / f"{tool.name}-{case.name}-{phase}-{rep}.log"
            if phase == "cold":
                tool.reset(case)
            elif phase == "incremental":
                touch_one_file(case.context, next(counter))
            elif cache_tool is not None:
                cache_tool.export_cache(case, log.with_suffix(".export.log"))
                tool.reset(case)  # a fresh worker: no build cache, base image kept
            flush()
            t0 = time.perf_counter()
            if cache_tool is not None:
                cache_tool.build_from_cache(case, log)
            else:
                tool.build(case, log)
            results.append(Result(tool.name, case.name, phase, time.perf_counter() - t0))
        except ToolError as exc:
            results.append(Result(tool.name, case.name, phase, None, str(exc)))
    return results


def summarise(results: Sequence[Result]) -> dict[tuple[str, str, str], float | None]:
    """Median seconds per (case, phase, tool); None when any repeat failed."""
    grouped: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        grouped.setdefault((r.case, r.phase, r.tool), []).append(r)
    return {
        key: None
        if any(r.seconds is None for r in rs)
        else statistics.median(r.seconds for r in rs if r.seconds is not None)
        for key, rs in grouped.items()
    }


def rotated(items: Sequence[T], rep: int) -> list[T]:
    """The order of repeat ``rep``: it starts at item ``rep mod n`` and wraps, so over n
    repeats every tool runs once in every position (after a big writer, first, last)."""
    if not items:
        return []
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def fastest_peer(
    summary: Mapping[tuple[str, str, str], float | None],
    case: str,
    phase: str,
    peers: Sequence[str] = PEERS,
) -> tuple[str, float] | None:
    """The peer with the lowest median on (case, phase): failed or absent peers do not
    count; None when no peer has a time (or the fastest took no measurable time)."""
    timed = [
        (seconds, peer)
        for peer in peers
        if (seconds := summary.get((case, phase, peer))) is not None and seconds > 0
    ]
    if not timed:
        return None
    seconds, peer = min(timed)
    return peer, seconds


@dataclass(frozen=True)
class Row:
    """One (case, phase) of the report: medians, the fastest peer, and the ratios."""

    case: str
    phase: str
    #: median seconds per tool; None when a repeat failed (tools not run are absent)
    medians: dict[str, float | None]
    fastest: str | None
    #: "ours/peer" (peer also "fastest") -> ours' median / the peer's
    ratios: dict[str, float | None]


def ratio_pairs(tools: Sequence[str]) -> list[tuple[str, str]]:
    """(ours, other) pairs the report shows, "fastest" first (the issue's targets are
    ratios to the fastest peer), then each peer, then the rootless comparisons."""
    ours = [o for o in OURS if o in tools]
    peers = [t for t in PEERS if t in tools]
    pairs = [(o, "fastest") for o in ours if o != "ociworker-rootless"] if peers else []
    pairs += [(o, t) for o in ours for t in peers]
    # rootless against root, and against rootless buildah
    for extra in (("ociworker-rootless", "ociworker"), ("ociworker-rootless", "buildah-rootless")):
        if all(t in tools for t in extra):
            pairs.append(extra)
    return pairs


def summary_rows(results: Sequence[Result], tools: Sequence[str]) -> list[Row]:
    summary = summarise(results)
    keys = sorted(
        {(c, p) for c, p, _ in summary},
        key=lambda cp: (
            ALL_CASES.index(cp[0]) if cp[0] in ALL_CASES else 99,
            PHASES.index(cp[1]),
        ),
    )
    rows = []
    for case, phase in keys:
        best = fastest_peer(summary, case, phase, [t for t in PEERS if t in tools])
        ratios: dict[str, float | None] = {}
        for ours, other in ratio_pairs(tools):
            a = summary.get((case, phase, ours))
            if other == "fastest":
                b: float | None = best[1] if best else None
            else:
                b = summary.get((case, phase, other))
            ratios[f"{ours}/{other}"] = a / b if a is not None and b else None
        medians = {t: summary[(case, phase, t)] for t in tools if (case, phase, t) in summary}
        rows.append(Row(case, phase, medians, best[0] if best else None, ratios))
    return rows


def format_table(results: Sequence[Result], tools: Sequence[str]) -> str:
    rows = summary_rows(results, tools)
    pairs = [f"{o}/{t}" for o, t in ratio_pairs(tools)]
    with_fastest = any(t == "fastest" for _, t in ratio_pairs(tools))

    def cell(row: Row, tool: str) -> str:
        if tool not in row.medians:
            return "-"
        value = row.medians[tool]
        return "FAILED" if value is None else f"{value:.2f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    header = ["case", "phase", *tools, *(["fastest"] if with_fastest else []), *pairs]
    lines_ = [header]
    for row in rows:
        line = [row.case, row.phase, *(cell(row, t) for t in tools)]
        line += [row.fastest or "-"] if with_fastest else []
        line += [ratio(row.ratios[p]) for p in pairs]
        lines_.append(line)
    widths = [max(len(r[i]) for r in lines_) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in lines_]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress_line(r: Result) -> str:
    shown = f"FAILED: {r.error}" if r.seconds is None else f"{r.seconds:.2f}s"
    return f"-- {r.case:<12} {r.phase:<11} {r.tool:<10} {shown}"


def parse_list(value: str, allowed: Sequence[str]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {value!r}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cases", type=lambda v: parse_list(v, ALL_CASES), default=list(ALL_CASES))
    p.add_argument("--tools", type=lambda v: parse_list(v, ALL_TOOLS), default=list(ALL_TOOLS[:4]))
    p.add_argument("--repeat", "-n", type=int, default=1, help="runs per case (median shown)")
    p.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH_DIR)
    p.add_argument(
        "--cases-dir",
        type=Path,
        default=OWN_CASES_DIR,
        help="our own cases, looked up after --bench-dir",
    )
    p.add_argument("--base", default=DEFAULT_BASE, help="base image (BASE build-arg)")
    p.add_argument(
        "--debian-base", default=DEFAULT_DEBIAN_BASE, help="the debian case's base image"
    )
    p.add_argument(
        "--output",
        choices=("store", "docker-archive"),
        default="store",
        help="what each tool leaves: an image in its local store (default), or that image "
        "also as a docker archive (ociworker -o type=docker, docker save, buildah push)",
    )
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    p.add_argument("--timeout", type=float, default=900, help="seconds per build")
    p.add_argument("--keep", action="store_true", help="keep the work dir for inspection")
    p.add_argument(
        "--registry-cache",
        action="store_true",
        help="also measure a fresh worker importing the case's registry cache (import phase)",
    )
    p.add_argument(
        "--network",
        choices=("host", "default"),
        default="host",
        help="ociworker's RUN network (the other tools always use host)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks need root (dockerd, buildah, runc)")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = (args.out / f"logs-{stamp}").resolve()
    logs.mkdir(parents=True)
    # Short path under /tmp: dockerd's unix socket path must stay under 108 bytes.
    work = Path(tempfile.mkdtemp(prefix="ocib-", dir="/tmp"))
    settings = Settings(
        base=args.base,
        work=work,
        logs=logs,
        timeout=args.timeout,
        network=args.network,
        output=args.output,
    )
    results: list[Result] = []
    tools: list[Tool] = []
    try:
        cases = load_cases(
            [args.bench_dir, args.cases_dir],
            args.cases,
            work,
            registry_cache=args.registry_cache,
            base=args.base,
            bases={"debian": args.debian_base},
        )
        for name in args.tools:
            tool: Tool = TOOL_TYPES[name](settings)
            try:
                tool.start()
                tools.append(tool)
            except ToolError as exc:
                print(f"!! {name} failed to start: {exc}", file=sys.stderr)
                for case in cases:
                    results += [Result(name, case.name, ph, None, str(exc)) for ph in case.phases]
        counter = iter(range(1, 1_000_000))
        for case in cases:
            for rep in range(args.repeat):
                for tool in rotated(tools, rep):
                    for r in run_case(tool, case, logs, rep, counter):
                        results.append(r)
                        print(progress_line(r), file=sys.stderr)
    finally:
        for tool in tools:
            try:
                tool.stop()
            except Exception as exc:  # one tool's clean-up must not hide the others'
                print(f"!! {tool.name} clean-up failed: {exc}", file=sys.stderr)
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            remove_tree(work)

    print(format_table(results, args.tools))
    (args.out / f"results-{stamp}.json").write_text(
        json.dumps([asdict(r) for r in results], indent=2) + "\n"
    )
    summary = [asdict(row) for row in summary_rows(results, args.tools)]
    (args.out / f"summary-{stamp}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nlogs and JSON results: {args.out}", file=sys.stderr)
    return 1 if any(r.seconds is None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
