"""Shared fixtures for the integration suite: real registry, real runtimes, real mounts.

The suite expects the host prepared by ``scripts/setup-host`` (root, runc + crun, a registry on
127.0.0.1:5000 holding ``busybox:latest``). Missing pieces fail loudly instead of skipping, so a
half-prepared machine can never pass by running nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

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
