"""The root/rootless legs of the integration suite (conftest's ``leg``, ``cli`` and
``rootless_skip``), run by a pytest of their own on a small test file, as a test author uses
them."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import CLI, import_path

HERE = Path(__file__).resolve().parent

_TESTS = """
import pytest

@pytest.mark.rootless_skip("it talks to the host's dockerd socket")
def test_marked(leg):
    pass

def test_plain(leg):
    print(f"ran-{leg}")
"""


def _pytest(tmp_path: Path, rootless: str, tests: str = _TESTS, rc: int = 0) -> list[str]:
    for name in ("conftest.py", "dockerd.py"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "test_sample.py").write_text(tests)
    env = {**os.environ, "OCIWORKER_TEST_ROOTLESS": rootless, "PYTHONPATH": import_path()}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'bt'}", "test_sample.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == rc, proc.stdout + proc.stderr
    return (proc.stdout + proc.stderr).splitlines()


def test_rootless_skip_skips_only_the_rootless_leg(tmp_path: Path) -> None:
    out = _pytest(tmp_path, "1")
    assert any("test_marked[root] PASSED" in ln for ln in out)
    assert any("test_plain[root] PASSED" in ln for ln in out)
    assert any("test_plain[rootless] PASSED" in ln for ln in out)
    (skip,) = [ln for ln in out if ln.startswith("SKIPPED")]
    assert skip.endswith("cannot run rootless: it talks to the host's dockerd socket"), skip


def test_rootless_legs_can_be_turned_off(tmp_path: Path) -> None:
    out = _pytest(tmp_path, "0")
    assert sum("[root] PASSED" in ln for ln in out) == 2
    skips = [ln for ln in out if ln.startswith("SKIPPED [1] ")]
    # the marked test still says its own reason; the other says the leg is off
    assert len(skips) == 2, out
    assert {ln.rsplit(": ", 1)[-1] for ln in skips} == {
        "it talks to the host's dockerd socket",
        "OCIWORKER_TEST_ROOTLESS=0",
    }


def test_rootless_skip_on_a_test_without_legs_is_an_error(tmp_path: Path) -> None:
    tests = '@__import__("pytest").mark.rootless_skip("why")\ndef test_x():\n    pass\n'
    out = _pytest(tmp_path, "1", tests, rc=4)  # pytest's usage error
    assert any("test_x: rootless_skip on a test without leg_cli" in ln for ln in out), out


def test_as_user_runs_ociworker_as_the_test_user(as_user: CLI) -> None:
    # What the rootless leg's commands rest on: the user's own uid, its HOME and XDG dirs.
    assert as_user.user is not None
    probe = "import os, sys; print(os.getuid(), os.environ['HOME'], os.environ['XDG_RUNTIME_DIR'])"
    # the same command line, with the interpreter running a probe instead of ociworker
    argv = [*as_user.argv("--version")[:-3], "-c", probe]
    uid, home, runtime = as_user.run(argv=argv).stdout.split()
    assert int(uid) == pwd.getpwnam(as_user.user).pw_uid
    assert Path(home) == as_user.home and Path(home).stat().st_uid == int(uid)
    assert Path(runtime).stat().st_uid == int(uid) and Path(runtime).stat().st_mode & 0o777 == 0o700
    version = as_user.run("--version").stdout.strip()
    assert version.startswith("ociworker ")


_MODULE = r"""
from pathlib import Path
from conftest import LEGS_MARK, current_cli

pytestmark = LEGS_MARK

def test_body(tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("root wrote this")
    cli = current_cli()
    # the interpreter ociworker would run, appending to the file root wrote
    probe = "import os, sys; open(sys.argv[1] + '/f', 'a').write('+'); print(os.getuid())"
    argv = [*cli.argv("--version")[:-3], "-c", probe, str(ctx)]
    uid = cli.run(argv=argv).stdout.strip()
    with open(Path(__file__).parent / "results", "a") as f:
        f.write(f"{uid} {(ctx / 'f').read_text()!r} {tmp_path == cli.home}\n")
"""


def test_a_file_with_legs_runs_the_same_body_as_each_user(tmp_path: Path, test_user: str) -> None:
    # pytestmark = LEGS_MARK: the body runs as root, then as the test user with tmp_path its
    # home; what root wrote there before a command is the user's by the time it runs.
    out = _pytest(tmp_path, "1", _MODULE, rc=0)
    results = set((tmp_path / "results").read_text().splitlines())
    want_uid = pwd.getpwnam(test_user).pw_uid
    assert results == {
        "0 'root wrote this+' True",
        f"{want_uid} 'root wrote this+' True",
    }, out
