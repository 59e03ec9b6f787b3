"""scripts/test-in-container, run for real: the worker image and the test image built by a
Docker Engine of the script's own, a small but real part of this suite run inside a
privileged container of it, and every test that pytest collects here for the same
arguments found passed in the junit XML the script copies out (not just "exit 0": a test
that silently did not run inside would pass that).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "test-in-container"

# A few tests of the parts a container is most likely to break: overlay snapshots (overlay
# on overlay), RUN mounts, whole builds with both runtimes, and what doctor says there.
SUBSET = [
    "integration/test_snapshot_overlay.py",
    "integration/test_run_mounts.py::test_tmpfs_mount",
    "integration/test_build.py::test_run_exit_code_fails_naming_step_command_and_code",
    "integration/test_build.py::test_user_from_image_passwd_and_network_none",
    "integration/test_doctor.py::test_doctor_as_root",
]

pytestmark = pytest.mark.skipif(
    os.environ.get("OCIWORKER_IN_CONTAINER") == "1",
    reason="already inside the test container: its engine would be a third level of nesting",
)


def _collected(args: list[str]) -> set[str]:
    """The test ids pytest collects on this host for ``args``, by pytest itself."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = {ln.strip() for ln in proc.stdout.splitlines() if "::" in ln}
    assert ids, proc.stdout
    return ids


def _junit_outcomes(path: Path) -> dict[str, str]:
    """test id -> passed | failed | error | skipped, from a junit XML file."""
    out: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        # classname is the module path dotted, then any classes: back to a pytest node id
        parts = case.attrib["classname"].split(".")
        n = next(
            i
            for i in range(len(parts), 0, -1)
            if (REPO / "/".join(parts[:i])).with_suffix(".py").exists()
        )
        node = "::".join(["/".join(parts[:n]) + ".py", *parts[n:], case.attrib["name"]])
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        out[node] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            kinds[0] if kinds else "", "passed"
        )
    return out


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One engine data root for this module's runs: the images are built once; its
    gigabytes go at the end rather than wait for pytest's tmp rotation."""
    cache = tmp_path_factory.mktemp("tic-cache")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def _run(engine: str, out: Path, cache: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--engine", engine, "--out", str(out), "--cache", str(cache), "--",
         *args],
        cwd=REPO, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        env={**os.environ, "OCIWORKER_VENV": str(Path(sys.executable).parent.parent)},
    )  # fmt: skip


def test_the_subset_passes_inside_docker_run_privileged(
    require_root: None, tmp_path: Path, engine_cache: Path
) -> None:
    want = _collected(SUBSET)
    proc = _run("docker", tmp_path / "out", engine_cache, SUBSET)
    junit = tmp_path / "out" / "junit.xml"
    assert junit.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    got = _junit_outcomes(junit)
    assert set(got) == want, (sorted(set(got) - want), sorted(want - set(got)))
    bad = {t: o for t, o in got.items() if o != "passed"}
    assert not bad, (bad, (tmp_path / "out" / "pytest.log").read_text()[-5000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # doctor inside saw a privileged container whose state dir is not overlay on overlay
    doctor = (tmp_path / "out" / "doctor.txt").read_text()
    assert doctor.splitlines()[-1].startswith("builds can run (as root")
    assert any(ln.split()[:2] == ["ok", "state-fs"] for ln in doctor.splitlines()), doctor


# Nested under ociworker: the root leg of a part of the subset (RUN --security=insecure is
# root's; /home is the step's own overlay root there, so rootless legs stay with Docker).
NESTED = [
    "integration/test_snapshot_overlay.py",
    "integration/test_doctor.py::test_doctor_as_root",
]


def test_the_subset_passes_nested_under_ociworker(
    require_root: None, tmp_path: Path, engine_cache: Path
) -> None:
    want = _collected(NESTED)
    out = tmp_path / "out"
    proc = _run("ociworker", out, engine_cache, NESTED)
    assert (out / "junit.xml").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    got = _junit_outcomes(out / "junit.xml")
    assert set(got) == want, (sorted(set(got) - want), sorted(want - set(got)))
    bad = {t: o for t, o in got.items() if o != "passed"}
    assert not bad, (bad, (out / "pytest.log").read_text()[-5000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the build that ran it was an ociworker build with the entitlement, its step insecure
    build_log = (out / "nested-build.log").read_text()
    assert "RUN --security=insecure" in build_log, build_log[-2000:]
    # doctor inside the step: a container (its overlay root), privileged, state on tmpfs
    doctor = {
        ln.split()[1]: ln.split(None, 2)
        for ln in (out / "doctor.txt").read_text().splitlines()
        if ln[:4].strip() in ("ok", "warn", "FAIL")
    }
    assert doctor["container"][2] == "in a container (/ is overlay)"
    assert doctor["privileged"][0] == "ok"
    assert doctor["state-fs"][2].startswith("/var/lib/ociworker is on tmpfs")
