"""Shared fixtures for the integration suite: real registry, real runtimes, real mounts.

The suite expects the host prepared by ``scripts/setup-host`` (root, runc + crun, a registry on
127.0.0.1:5000 holding ``busybox:latest``). Missing pieces fail loudly instead of skipping, so a
half-prepared machine can never pass by running nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dockerd import dockerd

# Re-exported so every integration test can request the private Docker Engine by name.
__all__ = ["dockerd"]

REGISTRY = "127.0.0.1:5000"
BASE_IMAGE = f"{REGISTRY}/busybox:latest"
RUNTIMES = ("runc", "crun")
_SETUP_HINT = "run scripts/setup-host (as root) first"
_MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Lets `pytest -m "not integration"` pick the unit suite alone from the repo root.
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)
        # rootless_skip only means something to a test with legs: elsewhere it would do nothing
        if item.get_closest_marker("rootless_skip") and "leg" not in getattr(
            item, "fixturenames", ()
        ):
            raise pytest.UsageError(f"{item.nodeid}: rootless_skip on a test without leg_cli")


def _status(url: str, *, method: str = "GET", accept: str | None = None) -> int | str:
    headers = {"Accept": accept} if accept else {}
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return str(exc)


@pytest.fixture(scope="session")
def registry() -> str:
    """``host:port`` of the local registry, after checking it serves the base image."""
    got = _status(f"http://{REGISTRY}/v2/")
    if got != 200:
        pytest.fail(f"no registry answering http://{REGISTRY}/v2/ ({got}): {_SETUP_HINT}")
    got = _status(
        f"http://{REGISTRY}/v2/busybox/manifests/latest", method="HEAD", accept=_MANIFEST_ACCEPT
    )
    if got != 200:
        pytest.fail(f"registry {REGISTRY} has no busybox:latest ({got}): {_SETUP_HINT}")
    return REGISTRY


@pytest.fixture(scope="session")
def base_image(registry: str) -> str:
    """Reference of the busybox base image in the local registry."""
    return f"{registry}/busybox:latest"


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (mounts, namespaces, runc/crun)")


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """Name of an OCI runtime on PATH; tests requesting it run once per runtime."""
    name = str(request.param)
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: {_SETUP_HINT}")
    return name


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` in this process's mount namespace, deepest first."""
    root = root.resolve()
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = Path(_unescape_mountinfo(line.split(" ")[4]))
            if point == root or root in point.parents:
                found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


@pytest.fixture(name="mounts_under")
def mounts_under_fixture() -> Callable[[Path], list[Path]]:
    """The mount lister behind ``state_dir``, for tests that check their own clean-up."""
    return mounts_under


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty state dir for one test; fails the test if it leaves any mount behind."""
    path = tmp_path / "state"
    path.mkdir()
    yield path
    leaked = mounts_under(path)
    for point in leaked:
        # Detach what leaked so one broken test does not pin the host's tmp dir for the rest.
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)
    assert not leaked, f"mounts left under {path}: {[str(p) for p in leaked]}"


@dataclass(frozen=True)
class ArchiveImage:
    """The digests an OCI archive holds for its image, each checked against its blob."""

    manifest_digest: str
    config_digest: str


def oci_archive_image(archive: Path) -> ArchiveImage:
    """Read an OCI layout tar as a consumer does: index.json -> manifest -> config.
    Each blob must hash to the digest that names it, so the config digest is the image ID
    any tool would compute from the archive (and not a number copied from elsewhere)."""

    def blob(tf: tarfile.TarFile, digest: str) -> bytes:
        algo, _, hexpart = digest.partition(":")
        f = tf.extractfile(f"blobs/{algo}/{hexpart}")
        assert f is not None, f"{archive}: no blob {digest}"
        data = f.read()
        assert algo == "sha256" and hashlib.sha256(data).hexdigest() == hexpart, (
            f"{archive}: blob {digest} does not hash to its name"
        )
        return data

    with tarfile.open(archive) as tf:
        f = tf.extractfile("index.json")
        assert f is not None, f"{archive}: no index.json"
        index = json.load(f)
        manifests = index["manifests"]
        assert len(manifests) == 1, f"{archive}: {len(manifests)} manifests in index.json"
        mdigest = str(manifests[0]["digest"])
        manifest = json.loads(blob(tf, mdigest))
        cdigest = str(manifest["config"]["digest"])
        blob(tf, cdigest)
    return ArchiveImage(mdigest, cdigest)


# --- what BuildKit lists for a Dockerfile -----------------------------------------------
#
# Tests that check which steps a build shows compute the expectation here, from the
# Dockerfile text, the way BuildKit's dockerfile2llb names its vertices (prefixCommand:
# "[STAGE i/n] INSTRUCTION args", n = the FROM of an image plus every ADD, COPY, RUN and
# WORKDIR; STAGE is the stage name, "stage-K" when unnamed, none when the Dockerfile has one
# stage), never from ociworker's own frontend. Enough of the syntax for the suite's
# Dockerfiles; anything else (heredocs, ONBUILD, escape directives) is refused.


@dataclass(frozen=True)
class ExpectedStep:
    """A step BuildKit lists; ``after`` are the steps it reads, listed before it.
    ``aliases``: the names of the same vertex in other stages (two stages ``FROM`` one
    image share one vertex, which BuildKit lists once, under either name)."""

    name: str
    after: tuple[str, ...]
    aliases: tuple[str, ...] = ()


_VAR_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _logical_lines(text: str) -> list[str]:
    """Instructions with continuations joined as BuildKit's parser joins them: the
    backslash (and blanks after it) dropped, the next line appended as it is, comment
    and empty lines inside a continuation skipped."""
    out: list[str] = []
    pending: str | None = None
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        line = raw if pending is not None else raw.lstrip()
        m = re.search(r"\\[ \t]*$", line)
        if m:
            pending = (pending or "") + line[: m.start()]
            continue
        out.append((pending or "") + line)
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def _expand(text: str, env: Mapping[str, str], *, keep_unset: bool) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in env:
            return env[name]
        return m.group(0) if keep_unset else ""

    return _VAR_RE.sub(sub, text)


def _flags(args: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key] = value
        args = args.lstrip()
    return flags, args


def _bare_ref(ref: str) -> str:
    """An image reference without tag and digest, and without docker.io/library/."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    last = last.split(":", 1)[0]
    ref = f"{head}/{last}" if head else last
    return ref.removeprefix("docker.io/").removeprefix("library/")


def normalize_step_name(name: str) -> str:
    """Compare step names up to what BuildKit and ociworker may print differently on the
    same input: BuildKit pads the step number to the width of the total (``[ 2/31]``) and
    prints a FROM's tag next to its digest; ociworker prints neither."""
    name = re.sub(
        r"^\[(?:(\S+)\s+)?\s*(\d+)/(\d+)\]",
        lambda m: f"[{m.group(1) + ' ' if m.group(1) else ''}{m.group(2)}/{m.group(3)}]",
        name,
    )
    m = re.match(r"^(\[[^\]]*\] FROM )(\S+)(.*)$", name)
    if m:
        name = m.group(1) + _bare_ref(m.group(2)) + m.group(3)
    return name


def buildkit_steps(
    dockerfile: str, build_args: Mapping[str, str] | None = None, target: str | None = None
) -> list[ExpectedStep]:
    """The steps BuildKit lists for ``dockerfile`` (names as BuildKit prints them), stages
    the target does not need left out, each stage's steps in order."""
    build_args = dict(build_args or {})
    global_args: dict[str, str] = {}
    stages: list[dict[str, object]] = []
    for line in _logical_lines(dockerfile):
        word, _, args = line.partition(" ")
        cmd = word.upper()
        args = args.lstrip()
        if "<<" in args or cmd == "ONBUILD":
            raise ValueError(f"buildkit_steps does not model {line!r}")
        if cmd == "ARG" and not stages:
            key, eq, default = args.partition("=")
            global_args[key] = build_args.get(key, default if eq else "")
            continue
        if cmd == "FROM":
            _, rest = _flags(args)
            parts = rest.split()
            base = _expand(parts[0], global_args, keep_unset=False)
            name = parts[2].lower() if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append({"base": base, "name": name, "cmds": [], "env": {}})
            continue
        if not stages:
            raise ValueError(f"instruction before FROM: {line!r}")
        st = stages[-1]
        env = st["env"]
        assert isinstance(env, dict)
        if cmd == "ARG":
            key, eq, default = args.partition("=")
            env[key] = build_args.get(key, global_args.get(key, default) if not eq else default)
        elif cmd == "ENV":
            key, eq, value = args.partition("=")
            if not eq:
                key, _, value = args.partition(" ")
            env[key] = value.strip()
        elif cmd in ("RUN", "COPY", "ADD", "WORKDIR"):
            cmds = st["cmds"]
            assert isinstance(cmds, list)
            # RUN keeps quotes and unset variables in its name (RawQuotes,
            # SkipUnsetEnv); the others are expanded as words.
            text = f"{cmd} {args}"
            cmds.append(_expand(text, env, keep_unset=cmd == "RUN"))

    labels = {str(st["name"]): i for i, st in enumerate(stages) if st["name"]}

    def stage_of(ref: str) -> int | None:
        if ref.lower() in labels:
            return labels[ref.lower()]
        if ref.isdigit() and int(ref) < len(stages):
            return int(ref)
        return None

    names: list[list[str]] = []
    reads: list[list[set[int]]] = []  # per stage, per step: stages it reads
    base_stage: list[int | None] = []
    for i, st in enumerate(stages):
        base = str(st["base"])
        from_stage = stage_of(base)
        base_stage.append(from_stage)
        cmds = st["cmds"]
        assert isinstance(cmds, list)
        image = from_stage is None and base != "scratch"
        total = len(cmds) + (1 if image else 0)
        label = "" if len(stages) == 1 else str(st["name"] or f"stage-{i}")
        width = int(1 + math.log10(total)) if total else 1

        def prefix(n: int, label: str = label, total: int = total, width: int = width) -> str:
            return f"[{label + ' ' if label else ''}{n:>{width}}/{total}]"

        steps: list[str] = []
        step_reads: list[set[int]] = []
        if image:
            steps.append(f"{prefix(1)} FROM {base}")
            step_reads.append(set())
        for text in cmds:
            flags, _ = _flags(text.partition(" ")[2])
            read: set[int] = set()
            for key, value in flags.items():
                opts = (
                    dict(o.partition("=")[::2] for o in value.split(",")) if key == "mount" else {}
                )
                for ref in (value if key == "from" else "", opts.get("from", "")):
                    j = stage_of(ref) if ref else None
                    if j is not None:
                        read.add(j)
            steps.append(f"{prefix(len(steps) + 1)} {text}")
            step_reads.append(read)
        names.append(steps)
        reads.append(step_reads)

    def last_step(i: int) -> str | None:
        if names[i]:
            return names[i][-1]
        b = base_stage[i]
        return last_step(b) if b is not None else None

    want = len(stages) - 1 if target is None else labels[target.lower()]
    needed: set[int] = set()

    def need(i: int) -> None:
        if i in needed:
            return
        needed.add(i)
        b = base_stage[i]
        if b is not None:
            need(b)
        for read in reads[i]:
            for j in read:
                need(j)

    need(want)
    out: list[ExpectedStep] = []
    same: dict[str, str] = {}  # a later stage's FROM -> the first stage's FROM of that image
    first_from: dict[str, int] = {}  # image -> its step in out
    for i in sorted(needed):
        for k, name in enumerate(names[i]):
            if k == 0 and base_stage[i] is None and str(stages[i]["base"]) != "scratch":
                ref = str(stages[i]["base"])
                if ref in first_from:
                    shared = out[first_from[ref]]
                    out[first_from[ref]] = ExpectedStep(
                        shared.name, shared.after, (*shared.aliases, name)
                    )
                    same[name] = shared.name
                    continue
                first_from[ref] = len(out)
            before: list[str] = []
            b = base_stage[i]
            prev = names[i][k - 1] if k else last_step(b) if b is not None else None
            if prev:
                before.append(same.get(prev, prev))
            for j in sorted(reads[i][k]):
                tail = last_step(j)
                if tail:
                    before.append(same.get(tail, tail))
            out.append(ExpectedStep(name, tuple(before)))
    return out


@dataclass(frozen=True)
class ShownStep:
    """A step as ``--progress=plain`` showed it: ``#number``, name, the states it
    reached in order (``CACHED``, ``DONE``, ``ERROR``)."""

    number: int
    name: str
    states: tuple[str, ...]


def plain_steps(stderr: str) -> list[ShownStep]:
    """Every ``#N`` of a plain progress output, in the order they were numbered."""
    names: dict[int, str] = {}
    states: dict[int, list[str]] = {}
    for line in stderr.splitlines():
        m = re.match(r"^#(\d+) (.*)$", line)
        if not m:
            continue
        n, rest = int(m.group(1)), m.group(2)
        if n not in names:
            names[n] = rest
            states[n] = []
        elif rest == "CACHED":
            states[n].append("CACHED")
        elif re.match(r"^DONE \d+\.\ds( \(cpu .*\))?$", rest):  # a RUN's figures
            states[n].append("DONE")
        elif rest.startswith("ERROR"):
            states[n].append("ERROR")
    return [ShownStep(n, names[n], tuple(states[n])) for n in sorted(names)]


def assert_lists_steps(
    stderr: str, expected: Sequence[ExpectedStep], states: Mapping[str, tuple[str, ...]]
) -> None:
    """``stderr`` (plain progress) lists exactly the ``expected`` steps (besides
    ``[internal]`` ones and the exporters'), each once, each after the steps it reads,
    each reaching the states ``states`` gives (by expected name; a missing name means
    ``("CACHED",)``)."""
    shown = [
        s
        for s in plain_steps(stderr)
        if s.name.startswith("[") and not s.name.startswith("[internal]")
    ]
    canonical = {
        normalize_step_name(alias): normalize_step_name(e.name)
        for e in expected
        for alias in e.aliases
    }
    got = [canonical.get(n, n) for n in (normalize_step_name(s.name) for s in shown)]
    want = {normalize_step_name(e.name): e for e in expected}
    assert sorted(got) == sorted(want), f"steps listed {got}, BuildKit lists {sorted(want)}"
    position = {name: i for i, name in enumerate(got)}
    for name, step in want.items():
        for before in step.after:
            assert position[normalize_step_name(before)] < position[name], (
                f"{name!r} listed before its input {before!r}:\n{stderr}"
            )
    for s, name in zip(shown, got, strict=True):
        e = want[name]
        assert s.states == states.get(e.name, ("CACHED",)), (
            f"{s.name!r} shown {s.states}, expected {states.get(e.name, ('CACHED',))}:\n{stderr}"
        )


# --- the rootless leg (issue 12, item 6) --------------------------------------------------
#
# A test that takes the ``leg_cli`` fixture runs twice: as root (this process's user) and as the
# test user scripts/setup-host makes (rootless). ``@pytest.mark.rootless_skip("why")`` skips
# such a test in the rootless leg only, saying why. OCIWORKER_TEST_ROOTLESS=0 skips every
# rootless leg (a host without user namespaces), =1 runs them even on a checkout that has no
# rootless worker yet (to watch them fail); unset, they run when the checkout has one.

TEST_USER = os.environ.get("OCIWORKER_TEST_USER", "ociw-test")
ROOTLESS_ENV = "OCIWORKER_TEST_ROOTLESS"
LEGS = ("root", "rootless")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "rootless_skip(reason): the test cannot run rootless; skip its rootless leg"
    )


def _rootless_gate() -> str | None:
    """Why no rootless leg runs in this session, or None when they run."""
    wanted = os.environ.get(ROOTLESS_ENV, "")
    if wanted == "0":
        return f"{ROOTLESS_ENV}=0"
    if wanted != "1" and importlib.util.find_spec("ociworker.rootless") is None:
        return f"this checkout has no rootless worker (ociworker.rootless); {ROOTLESS_ENV}=1 forces"
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "leg" not in metafunc.fixturenames:
        return
    gate = _rootless_gate()
    skip = metafunc.definition.get_closest_marker("rootless_skip")
    params = []
    for leg in LEGS:
        marks: list[pytest.MarkDecorator] = []
        if leg == "rootless" and skip is not None:
            marks.append(pytest.mark.skip(reason=f"cannot run rootless: {_skip_reason(skip)}"))
        elif leg == "rootless" and gate is not None:
            marks.append(pytest.mark.skip(reason=f"rootless leg off: {gate}"))
        params.append(pytest.param(leg, marks=marks, id=leg))
    metafunc.parametrize("leg", params)


def _skip_reason(mark: pytest.Mark) -> str:
    reason = mark.args[0] if mark.args else mark.kwargs.get("reason")
    if not reason:
        raise pytest.UsageError("@pytest.mark.rootless_skip needs a reason")
    return str(reason)


@dataclass(frozen=True)
class CLI:
    """``ociworker`` as one leg's user runs it. ``home`` is a dir that user owns: contexts,
    outputs and state of the test go there (root's tmp dirs are closed to the test user)."""

    user: str | None  # None: this process (root)
    home: Path
    env: Mapping[str, str]
    python: str

    @property
    def rootless(self) -> bool:
        return self.user is not None

    def argv(
        self, *args: str, env: Mapping[str, str] | None = None, pyflags: Sequence[str] = ()
    ) -> list[str]:
        """The command line that runs ``ociworker ARGS`` as the user (for wrapping or Popen);
        ``env`` adds variables (for root they go in the process env, see ``popen_env``),
        ``pyflags`` are the interpreter's own (``-X importtime``)."""
        cmd = [self.python, *pyflags, "-m", "ociworker", *args]
        if self.user is None:
            return cmd
        pairs = [f"{k}={v}" for k, v in sorted({**self.env, **(env or {})}.items())]
        return ["runuser", "-u", self.user, "--", "env", "-i", *pairs, *cmd]

    def popen_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to start ``argv(...)`` with: root's is this process's as it is
        now (a test's monkeypatch.setenv included), with the checkout's import path."""
        if self.user is None:
            return {**os.environ, "PYTHONPATH": self.env["PYTHONPATH"], **(env or {})}
        return {"PATH": os.environ.get("PATH", "")}

    def hand_over(self) -> None:
        """Give the user what the test (root) wrote in ``home`` since the last command:
        contexts, secrets, files a build reads. Only root-owned entries change hands, so
        what the user's builds wrote (its outputs, with the ids a test checks) stays as is: a
        rootless worker cannot make a host file root's."""
        if self.user is None:
            return
        for top, dirs, files in os.walk(self.home):
            here = Path(top)
            for name in [*dirs, *files]:
                p = here / name
                # a build of the test's other thread may remove what is listed meanwhile
                with contextlib.suppress(FileNotFoundError):
                    st = p.lstat()
                    if st.st_uid == 0:
                        os.lchown(p, *_ids(self.user))
                        if not stat.S_ISLNK(st.st_mode):
                            p.chmod(st.st_mode | 0o600 | (0o100 if stat.S_ISDIR(st.st_mode) else 0))

    def interrupt(self, proc: subprocess.Popen[Any], sig: int = signal.SIGINT) -> None:
        """Ctrl-C (or ``sig``) for ``proc`` (started from ``argv``): the signal goes to the
        ociworker process, as a terminal sends it. runuser passes on no SIGINT (and answers
        SIGTERM with its own "Session terminated" and a SIGKILL), so as the user it goes to
        runuser's child, ociworker itself; runuser exits with its status."""
        pid = proc.pid
        if self.user is not None:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            assert len(kids) == 1, f"runuser {pid} has children {kids}"
            pid = int(kids[0])
        os.kill(pid, sig)

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 600,
        argv: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``ociworker ARGS`` (or ``argv``, e.g. a wrapped ``self.argv(...)``), with the
        variables ``env`` added and ``input`` on stdin."""
        self.hand_over()
        cmd = list(argv) or self.argv(*args, env=env)
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
            env=self.popen_env(env),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            check=False,
        )
        if check and proc.returncode != 0:
            who = self.user or "root"
            raise AssertionError(
                f"ociworker {' '.join(args)} as {who} failed ({proc.returncode}):\n"
                f"{proc.stderr[-4000:]}"
            )
        return proc

    def own(self, src: Path, name: str | None = None) -> Path:
        """A copy of ``src`` (file or tree) in ``home``, owned by the user."""
        dest = self.home / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True)
        else:
            shutil.copy2(src, dest)
        self.give(dest)
        return dest

    def give(self, path: Path) -> None:
        """Make ``path`` (and what it holds) the user's, and writable by them."""
        if self.user is None:
            return
        paths = [path, *path.rglob("*")] if path.is_dir() else [path]
        pw = pwd.getpwnam(self.user)
        for p in paths:
            # lchown: a symlink the test made (to a host binary, say) is handed
            # over itself; chown would follow it and take the host's file
            os.lchown(p, pw.pw_uid, pw.pw_gid)
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o600 | (0o100 if p.is_dir() else 0))


@functools.cache
def _ids(user: str) -> tuple[int, int]:
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def import_path() -> str:
    """This process's import path as PYTHONPATH, absolute (a relative entry would resolve
    against the command's own cwd)."""
    return os.pathsep.join(str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir())


def root_cli(home: Path) -> CLI:
    """``ociworker`` as root (this process), run from ``home``."""
    return CLI(None, home, {**os.environ, "PYTHONPATH": import_path()}, sys.executable)


@functools.cache
def _user_python(user: str) -> str:
    """An interpreter the user may execute: this one, unless it lives where the user cannot
    go (a pyenv under /root), then the system's python3 of the same version."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    probe = f"import sys; sys.exit('%d.%d' % sys.version_info[:2] != {want!r})"
    for cand in (sys.executable, f"/usr/bin/python{want}", f"/usr/local/bin/python{want}"):
        argv = ["runuser", "-u", user, "--", cand, "-c", probe]
        if subprocess.run(argv, capture_output=True, check=False, cwd="/").returncode == 0:
            return cand
    pytest.fail(f"{user} can run no python {want}")


def _user_dir(user: str) -> Path:
    """A fresh dir under the system temp dir, owned by ``user`` (mode 0755)."""
    path = Path(tempfile.mkdtemp(prefix=f"ociw-{user}-"))
    path.chmod(0o755)
    shutil.chown(path, user, user)
    return path


@pytest.fixture(scope="session")
def test_user(require_root: None) -> str:
    """The rootless test user, checked to exist with its subordinate ranges."""
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.fail(f"no user {TEST_USER}: {_SETUP_HINT}")
    for kind in ("uid", "gid"):
        text = Path(f"/etc/sub{kind}").read_text()
        if not any(line.split(":")[0] in (TEST_USER, str(pw.pw_uid)) for line in text.splitlines()):
            pytest.fail(f"{TEST_USER} has no range in /etc/sub{kind}: {_SETUP_HINT}")
    return TEST_USER


@pytest.fixture
def as_user(test_user: str) -> Iterator[CLI]:
    """``ociworker`` run as the test user, with HOME and the XDG dirs in a fresh dir it owns
    (removed afterwards); the import path is this checkout's, as for root."""
    python = _user_python(test_user)
    home = _user_dir(test_user)
    runtime = home / "run"
    runtime.mkdir(mode=0o700)
    shutil.chown(runtime, test_user, test_user)
    env = {
        "HOME": str(home),
        "USER": test_user,
        "LOGNAME": test_user,
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "C.UTF-8",
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_RUNTIME_DIR": str(runtime),
        # this checkout first, then the venv's packages (a system python has none of them)
        "PYTHONPATH": import_path(),
    }
    try:
        yield CLI(test_user, home, env, python)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def leg_cli(leg: str, tmp_path: Path, request: pytest.FixtureRequest, require_root: None) -> CLI:
    """``ociworker`` as the leg's user: root, or the rootless test user (``as_user``)."""
    if leg == "root":
        return root_cli(tmp_path)
    user_cli: CLI = request.getfixturevalue("as_user")
    return user_cli


# A whole test file joins the legs with ``pytestmark = LEGS_MARK``: each of its tests runs as
# root and as the test user with the SAME body. In the rootless leg ``tmp_path`` is the user's
# home (root's own tmp dirs are closed to it), and the file's ``ow(...)`` helpers run
# ``current_cli()``, the leg's user, instead of this process.
LEGS_MARK = pytest.mark.usefixtures("leg")

_CURRENT: list[CLI] = []


@pytest.fixture
def tmp_path(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """pytest's ``tmp_path``; in a rootless leg, the test user's fresh home instead."""
    if "leg" in request.fixturenames and request.getfixturevalue("leg") == "rootless":
        user_cli: CLI = request.getfixturevalue("as_user")
        return user_cli.home
    return tmp_path


@pytest.fixture(autouse=True)
def _leg_current(request: pytest.FixtureRequest) -> Iterator[None]:
    if "leg" not in request.fixturenames:
        yield
        return
    _CURRENT.append(request.getfixturevalue("leg_cli"))
    try:
        yield
    finally:
        _CURRENT.pop()


def current_cli() -> CLI:
    """``ociworker`` as the running test's leg runs it; root (this process) in a test
    without legs."""
    return _CURRENT[-1] if _CURRENT else root_cli(Path.cwd())


def in_rootless_leg() -> bool:
    return bool(_CURRENT) and _CURRENT[-1].rootless


def exported_ids(uid: int, gid: int) -> tuple[int, int]:
    """The host owner of a file the image gives ``uid:gid``, in a type=local output: those ids
    as root; in the rootless leg the test user's own, since an unprivileged user's files are
    all its own (what buildctl run by a user writes too). The image's owners are checked in
    its layers by test_rootless.py."""
    if in_rootless_leg():
        return _ids(_CURRENT[-1].user or "")
    return uid, gid


#: host files the suite's tools run as or hand to the test user; a test that
#: chowned or chmodded one (a chown following a symlink did once) damages the host
_HOST_TOOLS = (
    "runc", "crun", "newuidmap", "newgidmap", "pasta", "slirp4netns", "fuse-overlayfs",
    "unshare", "nsenter", "git", "ssh", "docker", "dockerd", "buildah", "skopeo",
)  # fmt: skip
_HOST_FILES = (
    "/etc/subuid",
    "/etc/subgid",
    "/etc/passwd",
    "/etc/group",
    "/dev/fuse",
    "/dev/net/tun",
)


def _host_file_modes() -> dict[str, tuple[int, int, int]]:
    paths = [p for t in _HOST_TOOLS if (p := shutil.which(t))] + list(_HOST_FILES)
    seen: dict[str, tuple[int, int, int]] = {}
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(p)
            seen[os.path.realpath(p)] = (st.st_uid, st.st_gid, st.st_mode)
    return seen


@pytest.fixture(scope="session", autouse=True)
def host_files_untouched() -> Iterator[None]:
    """Fails the run if any test changed the owner or mode of a host tool or id file."""
    before = _host_file_modes()
    yield
    after = _host_file_modes()
    changed = {p: (before[p], after.get(p)) for p in before if after.get(p) != before[p]}
    assert not changed, f"host files changed by the suite (uid, gid, mode): {changed}"
