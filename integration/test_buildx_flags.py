"""The buildx flags of issue 13: ``--platform`` (the worker's own builds, a
foreign one is refused clearly), ``--pull`` and ``--no-cache-filter`` (embedded
and over the daemon); real runc, overlayfs and the local registry."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import plain_steps
from test_daemon import Daemon, start_daemon, stop_daemon

pytestmark = pytest.mark.usefixtures("require_root")

_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def _build(state: Path, ctx: Path, *args: str, addr: str = "") -> subprocess.CompletedProcess[str]:
    where = ["--addr", addr] if addr else ["--root", str(state)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ociworker",
            "build",
            *where,
            "--progress",
            "plain",
            *args,
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ctx(tmp: Path, name: str, df: str) -> Path:
    ctx = tmp / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(df)
    return ctx


def _registry_platform(base_image: str) -> str:
    """The base image's platform, as the registry's own config blob says (the
    host's: the base image is made for this machine by scripts/make-base-image)."""
    host, _, rest = base_image.partition("/")
    repo, _, tag = rest.partition(":")
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": _MANIFEST_TYPES}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        manifest = json.load(r)
    with urllib.request.urlopen(
        f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}", timeout=10
    ) as r:
        config = json.load(r)
    return f"{config['os']}/{config['architecture']}"


def _foreign(own: str) -> str:
    return "linux/s390x" if own != "linux/s390x" else "linux/arm64"


def test_platform_own_builds_foreign_is_refused(
    tmp_path: Path, state_dir: Path, base_image: str
) -> None:
    own = _registry_platform(base_image)
    ctx = _context = _ctx(tmp_path, "ctx", f"FROM {base_image}\nRUN uname -m > /arch\n")
    out = tmp_path / "out"
    ok = _build(state_dir, ctx, "--platform", own, "-o", f"type=local,dest={out}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (out / "arch").exists()
    foreign = _foreign(own)
    bad = _build(state_dir, _context, "--platform", foreign, "-o", f"type=local,dest={out}-2")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"--platform {foreign}: this worker builds {own} only" in bad.stderr, bad.stderr
    assert not (tmp_path / "out-2").exists()


@pytest.fixture(params=["embedded", "daemon"])
def where(request: pytest.FixtureRequest, tmp_path: Path, state_dir: Path) -> Iterator[str]:
    """Build embedded (``--root``: "") or through a daemon (its ``--addr``)."""
    if request.param == "embedded":
        yield ""
        return
    request.getfixturevalue("registry")
    d = start_daemon(tmp_path / "droot", tmp_path / "d.sock")
    yield d.addr
    assert stop_daemon(d) == 0


def test_pull_resolves_at_the_registry_not_the_image_store(
    tmp_path: Path, state_dir: Path, base_image: str, where: str
) -> None:
    # the image store gets an image under the base image's own name, with a marker
    local = _ctx(tmp_path, "local", f"FROM {base_image}\nRUN echo local > /marker\n")
    made = _build(state_dir, local, "-t", base_image, addr=where)
    assert made.returncode == 0, made.stderr[-3000:]
    df = f"FROM {base_image}\nRUN cat /marker > /seen 2>/dev/null || echo registry > /seen\n"
    ctx = _ctx(tmp_path, "ctx", df)
    plain = _build(state_dir, ctx, "-o", f"type=local,dest={tmp_path / 'a'}", addr=where)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (tmp_path / "a/seen").read_text() == "local\n"  # the image store first
    pulled = _build(state_dir, ctx, "--pull", "-o", f"type=local,dest={tmp_path / 'b'}", addr=where)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert (tmp_path / "b/seen").read_text() == "registry\n"  # --pull: the registry's


def _state(stderr: str, needle: str) -> tuple[str, ...]:
    found = [s for s in plain_steps(stderr) if needle in s.name]
    assert len(found) == 1, (needle, stderr)
    return found[0].states


def test_no_cache_filter_reruns_only_the_named_stage(
    tmp_path: Path, state_dir: Path, base_image: str, where: str
) -> None:
    df = f"""FROM {base_image} AS first
RUN cat /proc/sys/kernel/random/uuid > /a
FROM {base_image} AS second
RUN cat /proc/sys/kernel/random/uuid > /b
FROM {base_image}
COPY --from=first /a /a
COPY --from=second /b /b
"""
    ctx = _ctx(tmp_path, "ctx", df)
    one = _build(state_dir, ctx, "-o", f"type=local,dest={tmp_path / 'one'}", addr=where)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _build(
        state_dir,
        ctx,
        "--no-cache-filter",
        "first",
        "-o",
        f"type=local,dest={tmp_path / 'two'}",
        addr=where,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert _state(two.stderr, "random/uuid > /a") == ("DONE",)
    assert _state(two.stderr, "random/uuid > /b") == ("CACHED",)
    assert (tmp_path / "two/a").read_text() != (tmp_path / "one/a").read_text()
    assert (tmp_path / "two/b").read_text() == (tmp_path / "one/b").read_text()


@pytest.fixture
def daemon(tmp_path: Path, registry: str) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "droot", tmp_path / "d.sock")
    yield d
    assert stop_daemon(d) == 0


def test_flags_over_the_daemon(tmp_path: Path, daemon: Daemon, base_image: str) -> None:
    own = _registry_platform(base_image)
    ctx = _ctx(tmp_path, "ctx", f"FROM {base_image}\nRUN true\n")
    ok = _build(tmp_path, ctx, "--platform", own, addr=daemon.addr)
    assert ok.returncode == 0, ok.stderr[-3000:]
    foreign = _foreign(own)
    bad = _build(tmp_path, ctx, "--platform", foreign, addr=daemon.addr)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"this worker builds {own} only" in bad.stderr, bad.stderr


def _push_foreign(base_image: str, platform: str) -> str:
    """The base image pushed again, under the tag ``foreign``, as a
    single-platform image whose config says ``platform`` (through the registry's
    own API: its layers are already in the repository)."""
    host, _, rest = base_image.partition("/")
    repo, _, tag = rest.partition(":")
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": _MANIFEST_TYPES}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        manifest = json.load(r)
        media_type = r.headers["Content-Type"]
    with urllib.request.urlopen(
        f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}", timeout=10
    ) as r:
        config = json.load(r)
    config["os"], config["architecture"] = platform.split("/")[:2]
    data = json.dumps(config).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.Request(f"http://{host}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start, timeout=10) as r:
        location = r.headers["Location"]
    if location.startswith("/"):
        location = f"http://{host}{location}"
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{sep}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    urllib.request.urlopen(put, timeout=10).close()
    manifest["config"] = {**manifest["config"], "digest": digest, "size": len(data)}
    put = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/foreign",
        data=json.dumps(manifest).encode(),
        method="PUT",
        headers={"Content-Type": media_type},
    )
    urllib.request.urlopen(put, timeout=10).close()
    return f"{host}/{repo}:foreign"


def _registry_env(base_image: str) -> list[str]:
    host, _, rest = base_image.partition("/")
    repo, _, tag = rest.partition(":")
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": _MANIFEST_TYPES}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        manifest = json.load(r)
    with urllib.request.urlopen(
        f"http://{host}/v2/{repo}/blobs/{manifest['config']['digest']}", timeout=10
    ) as r:
        env: list[str] = json.load(r)["config"]["Env"]
    return env


def test_check_resolves_the_base_images(tmp_path: Path, state_dir: Path, base_image: str) -> None:
    """``--check``'s rules that need the base images (BuildKit's check resolves
    them too). dockerd 20.10's BuildKit has no --check: the messages are
    BuildKit's (frontend/dockerfile/linter/ruleset.go, docs/rules/undefined-var.md),
    the report's layout buildx's (lint.Warning.PrintTo: no link when a rule has none)."""
    own = _registry_platform(base_image)
    foreign = _foreign(own)
    ref = _push_foreign(base_image, foreign)
    # a variable the registry says the base image sets, and a misspelling of it
    var = _registry_env(base_image)[0].partition("=")[0]
    df = (
        f"FROM {base_image}\nCOPY ${var}X /x\nWORKDIR ${var}\nFROM {ref} AS other\nCOPY ${var} /y\n"
    )
    ctx = _ctx(tmp_path, "ctx", df)
    proc = _build(state_dir, ctx, "--check")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.startswith("Check complete, 2 warnings have been found!\n"), proc.stdout
    assert (
        "\nWARNING: UndefinedVar - https://docs.docker.com/go/dockerfile/rule/undefined-var/\n"
        f"Usage of undefined variable '${var}X' (did you mean ${var}?)\nDockerfile:2\n"
    ) in proc.stdout, proc.stdout
    assert (
        "\nWARNING: InvalidBaseImagePlatform\n"
        f'Base image {ref} was pulled with platform "{foreign}", '
        f'expected "{own}" for current build\nDockerfile:4\n'
    ) in proc.stdout, proc.stdout
    # a base nobody has fails the check, naming it (BuildKit: the check's error)
    host = base_image.partition("/")[0]
    bad = _build(state_dir, _ctx(tmp_path, "bad", f"FROM {host}/nope:1\n"), "--check")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"{host}/nope:1" in bad.stderr, bad.stderr


def test_check_over_the_daemon_equals_the_embedded_check(
    tmp_path: Path, state_dir: Path, daemon: Daemon, base_image: str
) -> None:
    """Over ``--addr`` the daemon resolves the base images (its platform, its
    store, the registry), so the report is the embedded one, byte for byte, and
    holds the warnings BuildKit's rules give (docs/rules/undefined-var.md,
    invalid-base-image-platform.md: messages from linter/ruleset.go)."""
    own = _registry_platform(base_image)
    foreign = _foreign(own)
    ref = _push_foreign(base_image, foreign)
    var = _registry_env(base_image)[0].partition("=")[0]
    df = (
        f"FROM {base_image}\nCOPY ${var}X /x\nWORKDIR ${var}\nFROM {ref} AS other\nCOPY ${var} /y\n"
    )
    ctx = _ctx(tmp_path, "ctx", df)
    embedded = _build(state_dir, ctx, "--check")
    remote = _build(tmp_path, ctx, "--check", addr=daemon.addr)
    assert remote.returncode == embedded.returncode == 1, remote.stderr[-3000:]
    assert remote.stdout == embedded.stdout
    assert remote.stdout.startswith("Check complete, 2 warnings have been found!\n"), remote.stdout
    assert (
        "\nWARNING: UndefinedVar - https://docs.docker.com/go/dockerfile/rule/undefined-var/\n"
        f"Usage of undefined variable '${var}X' (did you mean ${var}?)\nDockerfile:2\n"
    ) in remote.stdout, remote.stdout
    assert (
        "\nWARNING: InvalidBaseImagePlatform\n"
        f'Base image {ref} was pulled with platform "{foreign}", '
        f'expected "{own}" for current build\nDockerfile:4\n'
    ) in remote.stdout, remote.stdout
    # a base nobody has: the daemon's resolution fails the check, naming it
    host = base_image.partition("/")[0]
    bad = _build(
        tmp_path, _ctx(tmp_path, "bad", f"FROM {host}/nope:1\n"), "--check", addr=daemon.addr
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"{host}/nope:1" in bad.stderr, bad.stderr
