"""The worker image: the top-level Dockerfile built by ociworker and by dockerd's BuildKit.

Both builds take minutes, so they are made once (module fixtures) and shared by the tests:
the two file trees must be equal (path, type, owner, mode, content, link target) except the
few paths both builders leave timestamped, the two image configs must carry what the
Dockerfile says, and the image ociworker built must run under Docker Engine as a worker.

Everything here is real: debootstrap against the host's Debian mirror (scripts/make-debian-base),
the local registry, dockerd 20.10 with BuildKit, runc inside the image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import zstandard

from conftest import import_path
from dockerd import BOUNDED_RUNTIME, Dockerd

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"

# Paths whose content records when (or in which order) they were written, by dpkg/apt or by
# the builder itself, so the two builds could not agree on them: each would be compared for
# presence, type, owner and mode only, and the test prints the ones whose content differed.
# None is needed today: the Dockerfile deletes what apt and dpkg timestamp (their logs,
# ldconfig's aux-cache, the package lists) in the RUN that writes it, and SOURCE_DATE_EPOCH
# makes the pycs hash-based and shadow's last-change day fixed. debconf's *.dat files, the
# usual suspects, are written sorted. Add a path here only with the reason it must differ.
TIMESTAMPED: dict[str, str] = {}
# What the worker runs (runtimes, rootless helpers, the sandbox network's tools, git contexts).
TOOLS = (
    "runc",
    "crun",
    "newuidmap",
    "fuse-overlayfs",
    "pasta",
    "slirp4netns",
    "git",
    "nft",
    "ip",
    "tini",
)


@dataclass(frozen=True)
class Entry:
    """One path of an image's file tree, as `docker export` would show it."""

    kind: str  # file, dir, symlink, char, block, fifo
    uid: int
    gid: int
    mode: int  # permission bits with setuid/setgid/sticky
    digest: str  # sha256 of a file's content; "" otherwise
    target: str  # a symlink's target; "" otherwise


@dataclass(frozen=True)
class Archive:
    """What `docker save` (or `ociworker build --output type=docker`) wrote."""

    tree: dict[str, Entry]
    config: dict[str, Any]


_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def _norm(name: str) -> str:
    return str(PurePosixPath(name.removeprefix("./"))).strip("/")


def _layer_bytes(raw: bytes) -> bytes:
    # A docker archive's layers are plain tars from dockerd and may be compressed from others;
    # zstd is not something tarfile reads on its own.
    if raw[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def apply_layer(tree: dict[str, Entry], data: bytes) -> None:
    """Apply one layer tar to ``tree`` with the OCI whiteout rules (``.wh.NAME`` removes NAME,
    ``.wh..wh..opq`` empties its directory of what lower layers put there)."""
    with tarfile.open(fileobj=io.BytesIO(_layer_bytes(data)), mode="r:*") as tf:
        members = tf.getmembers()
        added: set[str] = set()
        # Whiteouts act on lower layers only, whatever their position in this tar.
        for m in members:
            path = _norm(m.name)
            parent, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                prefix = parent + "/" if parent else ""
                for p in [p for p in tree if p.startswith(prefix)]:
                    del tree[p]
            elif base.startswith(".wh."):
                gone = (parent + "/" if parent else "") + base.removeprefix(".wh.")
                for p in [p for p in tree if p == gone or p.startswith(gone + "/")]:
                    del tree[p]
        for m in members:
            path = _norm(m.name)
            if not path or path == "." or path.rpartition("/")[2].startswith(".wh."):
                continue
            if m.islnk():
                # A hard link is its target's content under a second name: compared as a file,
                # so which of the two names a builder wrote first does not matter.
                target = tree[_norm(m.linkname)]
                tree[path] = Entry("file", m.uid, m.gid, m.mode & 0o7777, target.digest, "")
            else:
                kind = _KINDS[m.type]
                digest = ""
                if kind == "file":
                    f = tf.extractfile(m)
                    assert f is not None
                    digest = hashlib.sha256(f.read()).hexdigest()
                if kind != "dir" and path in tree and tree[path].kind == "dir":
                    for p in [p for p in tree if p.startswith(path + "/")]:
                        del tree[p]
                target = m.linkname if kind == "symlink" else ""
                tree[path] = Entry(kind, m.uid, m.gid, m.mode & 0o7777, digest, target)
            added.add(path)


def read_docker_archive(path: Path) -> Archive:
    with tarfile.open(path) as tf:

        def member(name: str) -> bytes:
            f = tf.extractfile(name)
            assert f is not None, f"{path}: no {name}"
            return f.read()

        manifest = json.loads(member("manifest.json"))
        assert len(manifest) == 1, f"{path}: {len(manifest)} images, want 1"
        config = json.loads(member(manifest[0]["Config"]))
        tree: dict[str, Entry] = {}
        for layer in manifest[0]["Layers"]:
            apply_layer(tree, member(layer))
    assert len(manifest[0]["Layers"]) == len(config["rootfs"]["diff_ids"])
    return Archive(tree, config)


def _dockerfile_json(instruction: str) -> list[str]:
    """The exec-form argument list of the Dockerfile's (last) INSTRUCTION, read from its text."""
    found: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith(instruction + " "):
            found = json.loads(line.removeprefix(instruction + " "))
    assert found, f"no {instruction} in {DOCKERFILE}"
    return found


def _git_head() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def _cli_version() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ociworker", "--version"],
        env={**os.environ, "PYTHONPATH": import_path()},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0] == "ociworker", out
    return out[1]


def _script(name: str) -> str:
    """Run scripts/NAME; its stderr (where it logs)."""
    proc = subprocess.run(
        [str(REPO / "scripts" / name)],
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/{name} failed:\n{proc.stderr[-4000:]}"
    return proc.stderr


_MIRROR_RELEASE = "http://deb.debian.org/debian/dists/bookworm/Release"


# session scope: autouse fixtures of a scope come first, and debian_base is session-scoped
@pytest.fixture(autouse=True, scope="session")
def _mirror_in_container() -> None:
    """Inside scripts/test-in-container (a --network=none container) Debian's mirror cannot be
    reached, and debootstrap and the Dockerfile's apt-get need it: skip there, saying so. On a
    host the mirror is a requirement (setup-host installs from it), so there this never skips."""
    if os.environ.get("OCIWORKER_IN_CONTAINER") != "1":
        return
    try:
        urllib.request.urlopen(_MIRROR_RELEASE, timeout=10).close()
    except OSError as exc:
        pytest.skip(
            f"Debian's package mirror is unreachable in this container ({exc}): "
            "debootstrap and the Dockerfile's apt-get need it"
        )


@pytest.fixture(scope="session")
def debian_base(require_root: None, registry: str) -> str:
    """The Dockerfile's default BASE, made by the script the README tells users to run."""
    _script("make-debian-base")
    return f"{registry}/debian:bookworm"


@pytest.fixture(scope="session")
def inputs(debian_base: str) -> str:
    """What the Dockerfile takes besides its context: the base, and wheelhouse/ in it."""
    _script("make-wheelhouse")
    return debian_base


@dataclass(frozen=True)
class Built:
    archive: Archive
    path: Path  # the docker archive (`docker load` takes it)
    cold_s: float
    warm_s: float


def _timed(fn: Any) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


@pytest.fixture(scope="module")
def revision() -> str:
    return _git_head()


@pytest.fixture(scope="module")
def ours(inputs: str, revision: str, tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("ours")
    archive = tmp / "ours.tar"

    def build() -> None:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ociworker",
                "build",
                "--root",
                str(tmp / "state"),
                "--progress",
                "plain",
                "--build-arg",
                f"REVISION={revision}",
                "-t",
                "ociworker:ours",
                "--output",
                f"type=docker,dest={archive}",
                str(REPO),
            ],
            env={**os.environ, "PYTHONPATH": import_path()},
            capture_output=True,
            text=True,
            timeout=1800,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert proc.returncode == 0, f"ociworker build failed:\n{proc.stderr[-6000:]}"

    cold = _timed(build)
    warm = _timed(build)
    return Built(read_docker_archive(archive), archive, cold, warm)


@pytest.fixture(scope="module")
def theirs(
    inputs: str, revision: str, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory
) -> Built:
    tmp = tmp_path_factory.mktemp("theirs")
    archive = tmp / "theirs.tar"
    with pytest.MonkeyPatch.context() as mp:
        # The fixture's client inherits this process's environment: this selects BuildKit.
        mp.setenv("DOCKER_BUILDKIT", "1")

        def build() -> None:
            dockerd.docker(
                "build",
                "--network=host",
                "--progress=plain",
                "--build-arg",
                f"REVISION={revision}",
                "-t",
                "ociworker:theirs",
                str(REPO),
                timeout=1800,
            )

        cold = _timed(build)
        warm = _timed(build)
    history = dockerd.docker(
        "history", "--no-trunc", "--format", "{{.CreatedBy}}", "ociworker:theirs"
    )
    assert "# buildkit" in history.stdout, "dockerd did not build with BuildKit"
    dockerd.docker("save", "-o", str(archive), "ociworker:theirs")
    return Built(read_docker_archive(archive), archive, cold, warm)


def _registry_digest(ref: str) -> str:
    host, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.headers["Docker-Content-Digest"])


def test_debian_base_is_made_once(debian_base: str) -> None:
    before = _registry_digest(debian_base)
    said = _script("make-debian-base")
    assert f"debian base: {debian_base} is in the registry" in said, said
    assert _registry_digest(debian_base) == before
    # the cached layout is what the registry serves (a wiped registry gets it back as is)
    dev_state = Path(os.environ.get("OCIWORKER_DEV_STATE", "/var/lib/ociworker-dev"))
    assert _layout_digest(dev_state) == before


def _layout_digest(dev_state: Path) -> str:
    index = json.loads((dev_state / "debian-bookworm-oci" / "index.json").read_text())
    digests = [m["digest"] for m in index["manifests"]]
    assert len(digests) == 1, digests
    return str(digests[0])


def test_debian_base_is_reproducible(require_root: None, tmp_path: Path) -> None:
    # Two bootstraps from the mirror, minutes apart, in dev-state dirs of their own (nothing
    # pushed): the same manifest digest, so the base is the mirror's packages and nothing of
    # the moment it was made.
    digests = []
    for name in ("a", "b"):
        env = {**os.environ, "OCIWORKER_DEV_STATE": str(tmp_path / name)}
        proc = subprocess.run(
            [str(REPO / "scripts" / "make-debian-base"), "--force", "--no-push"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        digests.append(_layout_digest(tmp_path / name))
    assert digests[0] == digests[1]


def test_build_times(ours: Built, theirs: Built) -> None:
    # Figures, not assertions: wall-clock time depends on the machine and its load.
    print(
        f"\nworker image build: ociworker cold {ours.cold_s:.1f}s warm {ours.warm_s:.1f}s; "
        f"BuildKit (dockerd) cold {theirs.cold_s:.1f}s warm {theirs.warm_s:.1f}s; "
        f"ratio ociworker/BuildKit cold {ours.cold_s / theirs.cold_s:.2f} "
        f"warm {ours.warm_s / theirs.warm_s:.2f}"
    )
    assert ours.archive.tree and theirs.archive.tree


def test_file_trees_equal(ours: Built, theirs: Built) -> None:
    a, b = ours.archive.tree, theirs.archive.tree
    # sanity: the trees are the worker image's, not two equal empty ones
    for path in ("opt/ociworker/bin/ociworker", "usr/sbin/runc", "usr/bin/crun", "etc/subuid"):
        assert path in a, f"ociworker's image lacks /{path}"
    diffs: list[str] = []
    timestamped: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        mine, other = a.get(path), b.get(path)
        if mine == other:
            continue
        if (
            path in TIMESTAMPED
            and mine is not None
            and other is not None
            and (mine.kind, mine.uid, mine.gid, mine.mode)
            == (other.kind, other.uid, other.gid, other.mode)
        ):
            timestamped.append(path)
            continue
        diffs.append(f"/{path}: ociworker {mine} BuildKit {other}")
    print(f"\nexcluded paths whose content differed: {timestamped or 'none'}")
    print(f"compared {len(a)} paths")
    assert not diffs, f"{len(diffs)} paths differ:\n" + "\n".join(diffs[:60])


def test_image_configs(ours: Built, theirs: Built, revision: str) -> None:
    version = _cli_version()
    want_labels = {
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
    }
    entrypoint = _dockerfile_json("ENTRYPOINT")
    for who, built in (("ociworker", ours), ("BuildKit", theirs)):
        cfg = built.archive.config["config"]
        assert cfg["Entrypoint"] == entrypoint, who
        assert cfg["Healthcheck"]["Test"] == ["CMD", "ociworker", "info"], who
        labels = cfg["Labels"]
        for key, value in want_labels.items():
            assert labels.get(key) == value, f"{who}: {key}={labels.get(key)!r}, want {value!r}"
        for key in ("title", "description", "source", "licenses", "url"):
            assert labels.get(f"org.opencontainers.image.{key}"), f"{who}: no {key} label"
        assert "/var/lib/ociworker" in cfg["Volumes"], who
    mine, other = ours.archive.config["config"], theirs.archive.config["config"]
    for key in (
        "Entrypoint",
        "Cmd",
        "Healthcheck",
        "Labels",
        "Volumes",
        "User",
        "Env",
        "WorkingDir",
    ):
        assert mine.get(key) == other.get(key), (
            f"{key}: ociworker {mine.get(key)} BuildKit {other.get(key)}"
        )


def _wait_healthy(dockerd: Dockerd, name: str) -> str:
    """The container's health status once it is no longer "starting" (bounded, so a check
    that never settles fails the test with the container's log rather than hanging it)."""
    status = "starting"
    for _ in range(240):
        status = dockerd.docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
        if status != "starting":
            break
        time.sleep(0.5)
    return status


def test_the_image_runs_as_a_worker_under_docker(
    ours: Built, dockerd: Dockerd, tmp_path: Path
) -> None:
    version = _cli_version()
    dockerd.docker("load", "-i", str(ours.path))
    image = "ociworker:ours"
    # dockerd runs with --bridge=none (integration/dockerd.py): every container --network=none
    out = dockerd.docker(
        "run", "--rm", "--network=none", "--entrypoint", "ociworker", image, "--version"
    ).stdout
    assert out.split() == ["ociworker", version]
    # the rootless user: uid 1000 with a subordinate range for its user namespace
    out = dockerd.docker(
        "run",
        "--rm",
        "--network=none",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "id -u ociworker; grep '^ociworker:' /etc/subuid /etc/subgid; "
        f"for t in {' '.join(TOOLS)}; do command -v $t; done",
    ).stdout.splitlines()
    assert out[0] == "1000"
    for kind in ("uid", "gid"):
        line = next(x for x in out if x.startswith(f"/etc/sub{kind}:"))
        _, start, count = line.split(":", 1)[1].split(":")
        assert int(start) >= 65536 and int(count) >= 65536, line
    missing = [t for t in TOOLS if not any(x.endswith("/" + t) for x in out)]
    assert not missing, f"not on the image's PATH: {missing} ({out})"

    name = f"ow-image-{os.getpid()}"
    # the image's own ENTRYPOINT and HEALTHCHECK command; only the interval is shortened
    dockerd.docker(
        "run",
        "-d",
        "--privileged",
        f"--runtime={BOUNDED_RUNTIME}",
        "--network=none",
        "--name",
        name,
        "--health-interval=1s",
        image,
    )
    try:
        status = _wait_healthy(dockerd, name)
        logs = dockerd.docker("logs", name, check=False)
        assert status == "healthy", f"health {status}:\n{logs.stdout}\n{logs.stderr}"
        info = json.loads(
            dockerd.docker("exec", name, "ociworker", "info", "--format", "json").stdout
        )
        assert info["version"] == version
        assert info["root"] == "/var/lib/ociworker"
        assert info["rootless"] is False
        # A real build on that daemon (the one the ENTRYPOINT started: without --addr the CLI
        # would run a worker of its own), with a RUN step through the image's runc. The
        # container has no network to reach the registry, so the context brings the host's
        # static busybox as the whole root filesystem.
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        shutil.copy2("/bin/busybox", ctx / "busybox")
        (ctx / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "sh", "-c", '
            '"echo built in $(/bin/busybox uname -s) > /out.txt"]\n'
        )
        dockerd.docker("cp", str(ctx), f"{name}:/tmp/ctx")
        script = (
            "ociworker build --addr unix:///run/ociworker/ociworker.sock --network none "
            "-o type=local,dest=/tmp/out /tmp/ctx && cat /tmp/out/out.txt"
        )
        built = dockerd.docker("exec", name, "sh", "-c", script, timeout=600)
        assert built.stdout.splitlines()[-1] == "built in Linux", built.stderr[-3000:]
        # `docker stop` is SIGTERM through tini: the daemon stops its builds and exits 0
        dockerd.docker("stop", "-t", "60", name, timeout=120)
        code = dockerd.docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        logs = dockerd.docker("logs", name, check=False)
        assert code == "0", f"exit {code}:\n{logs.stdout[-2000:]}\n{logs.stderr[-2000:]}"
    finally:
        dockerd.docker("rm", "-f", "-v", name, check=False)
