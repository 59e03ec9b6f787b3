"""The pytest plugin, used as another project uses it: ``pytest`` run in a
subprocess on a copy of ``examples/pytest`` outside this repository (no conftest
of ours, the plugin loaded by its ``pytest11`` entry point), serially, under
pytest-xdist with two workers, and building on a daemon this test starts.
Which tests ran is read from pytest's junit XML and compared with the test
functions of the example file, found in its AST (not from pytest's own count).

A second project exercises the rest of the fixtures (push, pull, tags,
manifest, whiteouts, a failed build) against the real registry's answers.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ociworker.testing.daemon import spawn_daemon

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pytest"


def _test_functions(path: Path) -> set[str]:
    """``test_*`` functions of a test module, and ``Test*`` classes' methods, by name."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {
                f"{node.name}.{n.name}"
                for n in node.body
                if isinstance(n, ast.FunctionDef) and n.name.startswith("test")
            }
    return names


def _calls(path: Path, name: str) -> int:
    """How many calls of ``name(...)`` the module makes."""
    return sum(
        1
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name
    )


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """PYTHONPATH for the other project's pytest: this checkout's package, and,
    when the installed distribution predates the entry point (an old editable
    install), a dist-info declaring the entry point exactly as pyproject.toml
    does (read from it), so what is tested is the declaration itself."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
        "pytest11"
    ]
    assert declared == {"ociworker": "ociworker.testing.pytest_plugin"}
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("ociworker").entry_points
        if ep.group == "pytest11"
    }
    paths = [str(REPO / "src")]
    if installed != declared:
        site = tmp_path_factory.mktemp("entrypoint")
        info = site / "ociworker_pytest_entrypoint-0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: ociworker-pytest-entrypoint\nVersion: 0\n"
        )
        lines = [f"{k} = {v}" for k, v in declared.items()]
        (info / "entry_points.txt").write_text("[pytest11]\n" + "\n".join(lines) + "\n")
        paths.append(str(site))
    return os.pathsep.join(paths)


def _run_project(
    project: Path, args: Sequence[str], pythonpath: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], ET.Element]:
    junit = project.parent / f"junit-{project.name}.xml"
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "OCIWORKER_")) and k != "PYTHONPATH"
    }
    environ.update(env or {}, PYTHONPATH=pythonpath)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            # the plugin must not warn in a project that turns warnings into errors
            # (pytest-asyncio, in this venv for our own suite, warns about its config)
            "-p",
            "no:asyncio",
            "-W",
            "error",
            f"--junitxml={junit}",
            f"--basetemp={project.parent / ('bt-' + project.name)}",
            "-q",
            *args,
        ],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    assert junit.is_file(), f"pytest wrote no junit XML:\n{proc.stdout}\n{proc.stderr}"
    return proc, ET.parse(junit).getroot()


def _passed(root: ET.Element) -> list[str]:
    """The test cases of a junit report that passed (no failure, error or skip)."""
    out = []
    for case in root.iter("testcase"):
        if any(child.tag in ("failure", "error", "skipped") for child in case):
            continue
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        name = case.get("name", "")
        out.append(f"{cls}.{name}" if cls.startswith("Test") else name)
    return out


def _copy_example(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    return project


@pytest.fixture
def daemon(
    tmp_path: Path, require_root: None, mounts_under: Callable[[Path], list[Path]]
) -> Iterator[str]:
    """A real ``ociworker serve`` on a socket of its own; its address."""
    root = tmp_path / "daemon-root"
    addr = f"unix://{tmp_path / 'ociworker.sock'}"
    proc = spawn_daemon(["--addr", addr, "--root", str(root)], tmp_path / "daemon.log")
    try:
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not mounts_under(root), f"the daemon left mounts under {root}"


def _history_count(addr: str) -> int:
    from ociworker.api.client import Client

    async def count() -> int:
        async with Client(addr) as client:
            return len(await client.history_records())

    return asyncio.run(count())


@pytest.mark.parametrize("mode", ["serial", "serial-crun", "xdist"])
def test_example_passes_as_another_projects_suite(
    mode: str,
    tmp_path: Path,
    plugin_path: str,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    project = _copy_example(tmp_path)
    expected = _test_functions(project / "test_example.py")
    assert len(expected) >= 2

    args = {
        "serial": ["-p", "no:xdist"],
        "serial-crun": ["-p", "no:xdist", "--ociworker-runtime", "crun"],
        "xdist": ["-n", "2"],
    }[mode]
    proc, report = _run_project(project, args, plugin_path)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = _passed(report)
    assert sorted(passed) == sorted(expected), proc.stdout
    # the session's workers closed: nothing of theirs is still mounted
    assert not mounts_under(tmp_path), mounts_under(tmp_path)
    # the runtime asked for is the one that ran the steps (its state dir is the only one)
    runtimes = {p.name for p in (tmp_path / "bt-project").glob("**/root/executor/runtime/*")}
    assert runtimes == {"crun" if mode == "serial-crun" else "runc"}
    if mode == "xdist":
        # each xdist worker had a registry and a worker state dir of its own
        base = tmp_path / "bt-project"
        configs = sorted(base.glob("popen-gw*/registry[0-9]*/registry.yml"))
        assert len(configs) == 2, sorted(base.glob("popen-gw*/*"))
        addrs = {line for c in configs for line in c.read_text().splitlines() if "addr:" in line}
        assert len(addrs) == 2, addrs
        assert len(list(base.glob("popen-gw*/ociworker[0-9]*/root"))) == 2


def test_example_builds_on_the_daemon_from_ociworker_host(
    tmp_path: Path, plugin_path: str, daemon: str
) -> None:
    project = _copy_example(tmp_path)
    expected = _test_functions(project / "test_example.py")
    before = _history_count(daemon)

    proc, report = _run_project(project, [], plugin_path, {"OCIWORKER_HOST": daemon})

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(_passed(report)) == sorted(expected), proc.stdout
    # every build of the example was the daemon's (its history has one record each)
    builds = _calls(project / "test_example.py", "ociworker_build")
    assert _history_count(daemon) - before == builds


FIXTURES_PROJECT = """
import hashlib
import json
import subprocess

import pytest

from ociworker.errors import BuildFailed


def test_push_pull_tags_manifest(ociworker_build, ociworker_registry, ociworker_base_image):
    image = ociworker_build(
        f"FROM {ociworker_base_image}\\nRUN echo v1 > /version\\n",
        tags=["example.com/team/app:v1"],
        push=True,
    )
    ref = ociworker_registry.ref("team/app", "v1")
    assert image.pushed == (ref,)
    assert ociworker_registry.tags("team/app") == ["v1"]
    # the registry's own answer: the manifest it serves hashes to the image's digest
    served = ociworker_registry.manifest(ref)
    assert served["config"]["digest"] == image.id
    pulled = ociworker_registry.pull(ref)
    assert pulled.digest == image.digest
    assert pulled.read("/version") == b"v1\\n"
    assert pulled.run(["cat", "/version"]).stdout == "v1\\n"
    # skopeo's view of the registry, not ours
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True, check=True,
    ).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.digest


def test_deleted_files_are_gone_from_files_and_from_the_container(
    ociworker_build, ociworker_base_image
):
    image = ociworker_build(
        f"FROM {ociworker_base_image}\\nRUN rm /etc/group && mkdir /data && touch /data/x\\n"
    )
    files = image.files()
    assert "/etc/group" not in files and "/etc/passwd" in files
    assert any(".wh.group" in n for n in image.layers[-1].names())
    # the listing agrees with the kernel's view of the same image
    seen = image.run(
        "find / -xdev \\\\( -path /proc -o -path /sys -o -path /dev \\\\) -prune -o -print"
    )
    listed = {p for p in seen.stdout.split() if p != "/"}
    skip = ("/proc", "/sys", "/dev", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname")
    assert {p for p in files if not p.startswith(skip)} == {
        p for p in listed if not p.startswith(skip)
    }


def test_run_is_sandboxed_with_no_network(ociworker_build, ociworker_base_image):
    image = ociworker_build(f"FROM {ociworker_base_image}\\n")
    links = image.run("ls /sys/class/net").stdout.split()
    assert links == ["lo"]
    assert image.run(["sh", "-c", "exit 7"]).returncode == 7
    with pytest.raises(subprocess.CalledProcessError):
        image.run("false", check=True)
    assert image.run("id -u", user="1000").stdout == "1000\\n"


def test_an_image_as_a_named_context_and_a_secret_by_value(ociworker_build, ociworker_base_image):
    first = ociworker_build(f"FROM {ociworker_base_image}\\nRUN echo from-first > /first\\n")
    second = ociworker_build(
        "FROM base\\n"
        "RUN --mount=type=secret,id=tok test \\"$(cat /run/secrets/tok)\\" = s3cret-value"
        " && echo ok > /checked\\n",
        build_contexts={"base": first},
        secrets={"tok": "s3cret-value"},
    )
    assert second.read("/first") == b"from-first\\n"
    assert second.read("/checked") == b"ok\\n"
    # the first image's layers are the second's lower ones, untouched
    assert [l.digest for l in second.layers[: len(first.layers)]] == [
        l.digest for l in first.layers
    ]
    for layer in second.layers:
        assert b"s3cret-value" not in layer.tar_path.read_bytes()


def test_a_context_directory_and_its_dockerfile(ociworker_build, ociworker_base_image, tmp_path):
    (tmp_path / "app.txt").write_text("app\\n")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "Dockerfile.prod").write_text(
        f"FROM {ociworker_base_image} AS one\\nCOPY app.txt /one.txt\\n"
        f"FROM {ociworker_base_image} AS two\\nCOPY app.txt /two.txt\\n"
    )
    image = ociworker_build(tmp_path, file="build/Dockerfile.prod", target="one")
    assert image.read("/one.txt") == b"app\\n"
    assert "/two.txt" not in image.files()
    # a string naming a directory is a context too
    same = ociworker_build(str(tmp_path), file="build/Dockerfile.prod", target="two")
    assert same.read("/two.txt") == b"app\\n" and "/one.txt" not in same.files()


def test_a_failed_build_raises_with_its_log(ociworker_build, ociworker_base_image):
    with pytest.raises(BuildFailed) as info:
        ociworker_build(f"FROM {ociworker_base_image}\\nRUN echo about-to-fail && exit 3\\n")
    message = str(info.value)
    assert "exit code: 3" in message
    # the step's own output, as the plain progress shows it, is in the message
    printed = [
        line for line in info.value.log.splitlines()
        if line.rstrip().endswith(" about-to-fail") and "echo" not in line
    ]
    assert printed, info.value.log
    assert printed[0] in message
"""


def test_the_fixtures_against_the_real_registry(
    tmp_path: Path, plugin_path: str, require_root: None
) -> None:
    project = tmp_path / "fixtures"
    project.mkdir()
    (project / "test_fixtures.py").write_text(textwrap.dedent(FIXTURES_PROJECT))
    expected = _test_functions(project / "test_fixtures.py")

    proc, report = _run_project(project, ["-p", "no:xdist"], plugin_path)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(_passed(report)) == sorted(expected), proc.stdout
