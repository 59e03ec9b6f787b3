"""The worker image: the top-level Dockerfile built by ociworker and by dockerd's BuildKit.

Both builds take minutes, so they are made once (module fixtures) and shared by the tests:
the two file trees must be equal (path, type, owner, mode, content, link target) except the
few paths both builders leave timestamped, the two image configs must carry what the
Dockerfile says, and the image ociworker built must run under Docker Engine as a worker.

Everything here is real: debootstrap against the host's Debian mirror (scripts/make-debian-base),
the local registry, dockerd 20.10 with BuildKit, runc inside the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import zstandard
from conftest import import_path
from dockerd import Dockerd

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"

# Paths whose content records when (or in which order) they were written, by dpkg/apt or by
# the builder itself, so the two builds cannot agree on them. Each is still compared for
# presence, type, owner and mode; only the content is let go. The test prints the ones that
# did differ.
TIMESTAMPED: dict[str, str] = {
    # debconf's database: each package's configuration writes entries in a hash order that
    # differs run to run (a Perl hash), nothing the image's behaviour depends on
    "var/cache/debconf/config.dat": "debconf writes its entries in Perl hash order",
    "var/cache/debconf/templates.dat": "debconf writes its entries in Perl hash order",
}


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


def _script(name: str) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / name)],
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/{name} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="session")
def debian_base(require_root: None, registry: str) -> str:
    """The Dockerfile's default BASE, made by the script the README tells users to run."""
    _script("make-debian-base")
    _script("make-wheelhouse")
    return f"{registry}/debian:bookworm"


@dataclass(frozen=True)
class Built:
    archive: Archive
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
def ours(
    debian_base: str, revision: str, tmp_path_factory: pytest.TempPathFactory
) -> Built:
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
    return Built(read_docker_archive(archive), cold, warm)


@pytest.fixture(scope="module")
def theirs(
    debian_base: str, revision: str, dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory
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
    history = dockerd.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", "ociworker:theirs")
    assert "# buildkit" in history.stdout, "dockerd did not build with BuildKit"
    dockerd.docker("save", "-o", str(archive), "ociworker:theirs")
    return Built(read_docker_archive(archive), cold, warm)


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
            and (mine.kind, mine.uid, mine.gid, mine.mode) == (other.kind, other.uid, other.gid, other.mode)
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
    for key in ("Entrypoint", "Cmd", "Healthcheck", "Labels", "Volumes", "User", "Env", "WorkingDir"):
        assert mine.get(key) == other.get(key), f"{key}: ociworker {mine.get(key)} BuildKit {other.get(key)}"
