"""The release: one version everywhere it shows, a changelog that names it, and a
wheel and sdist that ``twine check --strict`` passes, that hold what users and a
rebuild need (the sdist builds the same wheel again)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

import pytest

from ociworker.version import __version__

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _copy_checkout(dest: Path) -> None:
    # A copy of what git tracks (and new files it does not ignore): building in
    # the checkout would leave build/ and an egg-info in src/.
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
            target.chmod(src.stat().st_mode & 0o777)


def _build(src: Path, out: Path, *what: str) -> None:
    proc = subprocess.run(
        [PY, "-m", "build", "--no-isolation", *what, "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path
    rebuilt: Path  # the wheel built from the unpacked sdist


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dists]:
    base = tmp_path_factory.mktemp("release")
    tree = base / "tree"
    _copy_checkout(tree)
    _build(tree, base / "dist", "--sdist", "--wheel")
    (wheel,) = (base / "dist").glob("*.whl")
    (sdist,) = (base / "dist").glob("*.tar.gz")
    unpacked = base / "unpacked"
    with tarfile.open(sdist) as tf:
        tf.extractall(unpacked, filter="data")
    (root,) = unpacked.iterdir()
    _build(root, base / "again", "--wheel")
    (rebuilt,) = (base / "again").glob("*.whl")
    yield Dists(wheel, sdist, rebuilt)


def _metadata(text: str) -> dict[str, str]:
    return dict(HeaderParser().parsestr(text).items())


def test_twine_check_strict_passes(dists: Dists) -> None:
    proc = subprocess.run(
        [PY, "-m", "twine", "check", "--strict", str(dists.wheel), str(dists.sdist)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_dist_names_and_metadata_carry_the_version(dists: Dists) -> None:
    assert dists.wheel.name == f"ociworker-{__version__}-py3-none-any.whl"
    assert dists.sdist.name == f"ociworker-{__version__}.tar.gz"
    with zipfile.ZipFile(dists.wheel) as zf:
        meta = _metadata(zf.read(f"ociworker-{__version__}.dist-info/METADATA").decode())
    assert meta["Version"] == __version__
    assert meta["Description-Content-Type"] == "text/markdown"  # README renders on PyPI
    with tarfile.open(dists.sdist) as tf:
        member = tf.extractfile(f"ociworker-{__version__}/PKG-INFO")
        assert member is not None
        assert _metadata(member.read().decode())["Version"] == __version__


def test_wheel_holds_types_protos_and_the_console_script(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(f"ociworker-{__version__}.dist-info/entry_points.txt").decode()
    assert "ociworker/py.typed" in names
    protos = {
        str(p.relative_to(REPO / "src")) for p in (REPO / "src" / "ociworker").rglob("*.proto")
    }
    assert protos and protos <= names
    # every module of the source tree is in the wheel
    modules = {
        str(p.relative_to(REPO / "src"))
        for p in (REPO / "src" / "ociworker").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= names, sorted(modules - names)[:10]
    assert re.search(r"^\[console_scripts\]\nociworker = ociworker\.cli:main$", entry_points, re.M)


def test_sdist_rebuilds_the_same_wheel(dists: Dists) -> None:
    def files(wheel: Path) -> dict[str, str]:
        with zipfile.ZipFile(wheel) as zf:
            return {
                n: hashlib.sha256(zf.read(n)).hexdigest()
                for n in zf.namelist()
                if not n.endswith("/RECORD")  # RECORD lists the same, with its own order
            }

    assert files(dists.rebuilt) == files(dists.wheel)


def test_sdist_carries_the_changelog(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as tf:
        names = set(tf.getnames())
    assert f"ociworker-{__version__}/CHANGELOG.md" in names
    assert f"ociworker-{__version__}/README.md" in names


def test_cli_version_is_the_one_source() -> None:
    proc = subprocess.run(
        [PY, "-m", "ociworker", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout == f"ociworker {__version__}\n"


def test_pyproject_reads_the_version_from_the_module() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "ociworker.version.__version__"


def _releases(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^## \[(\d+\.\d+\.\d+[^\]]*)\] - (\d{4}-\d{2}-\d{2})$", text, re.M)


def test_changelog_latest_release_is_this_version() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    releases = _releases(text)
    assert releases, "no '## [X.Y.Z] - YYYY-MM-DD' heading"
    assert releases[0][0] == __version__
    # Keep a Changelog: Unreleased on top, newest release first, each with a link
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert headings[0] == "Unreleased"
    dates = [d for _, d in releases]
    assert dates == sorted(dates, reverse=True)
    for name in headings:
        assert re.search(rf"^\[{re.escape(name)}\]: \S+$", text, re.M), f"no link for [{name}]"


def test_worker_image_version_label_defaults_to_this_version() -> None:
    # The Dockerfile cannot import the package, so its VERSION default is a second spelling of
    # the version: a release that bumps only version.py must fail here, not in a built image.
    defaults = re.findall(r"^ARG VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert defaults == [__version__]
