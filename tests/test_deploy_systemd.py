"""deploy/systemd: the units pass ``systemd-analyze verify`` without a word, and
their ExecStart is a command line the real CLI accepts, serving the socket the
.socket unit makes at the address clients use by default."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ociworker.cli import make_parser, serve_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
INSTALLED = "/usr/local/bin/ociworker"  # where the units expect the console script
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")

PAIRS = {"system": DEPLOY, "user": DEPLOY / "user"}


def unit(kind: str, name: str) -> configparser.ConfigParser:
    # systemd's format is close enough to ini for these files (no repeated keys)
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((PAIRS[kind] / name).read_text())
    return cp


def exec_start(kind: str) -> list[str]:
    return shlex.split(unit(kind, "ociworker.service")["Service"]["ExecStart"])


@needs_analyze
@pytest.mark.parametrize("kind", PAIRS)
def test_units_verify_without_warnings(kind: str, tmp_path: Path) -> None:
    # The verifier checks ExecStart's binary exists: point it at this venv's
    # console script (a copy in tmp; the host's /usr/local is not touched).
    script = Path(sys.executable).with_name("ociworker")
    assert os.access(script, os.X_OK), f"no console script {script} (pip install -e .)"
    files = []
    for name in ("ociworker.socket", "ociworker.service"):
        text = (PAIRS[kind] / name).read_text()
        if name.endswith(".service"):
            assert f"ExecStart={INSTALLED} " in text
            text = text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={script} ")
        (tmp_path / name).write_text(text)
        files.append(str(tmp_path / name))
    env = dict(os.environ)
    user = ["--user"] if kind == "user" else []
    if kind == "user":
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(run)  # the user manager's %t
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, *user, "verify", "--man=no", *files],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # verify reports unknown keys, bad values and missing binaries as warnings
    # with exit status 0: any word is a failure
    assert proc.stdout + proc.stderr == ""


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # the test above relies on verify speaking up; check it does, here
    bad = tmp_path / "ociworker.service"
    bad.write_text(
        (DEPLOY / "ociworker.service")
        .read_text()
        .replace("Delegate=yes", "Delegat=yes")
        .replace(INSTALLED, str(Path(sys.executable).with_name("ociworker")))
    )
    (tmp_path / "ociworker.socket").write_text((DEPLOY / "ociworker.socket").read_text())
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(tmp_path / "ociworker.socket"), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Unknown key 'Delegat'" in proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", PAIRS)
def test_exec_start_is_a_serve_command_line_on_the_activated_socket(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = exec_start(kind)
    assert argv[0] == INSTALLED
    args = make_parser().parse_args(argv[1:])
    assert args.command == "serve"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cfg = serve_config(args)  # the daemon's own checks of the address and flags
    assert cfg.addr == "fd://"
    service = unit(kind, "ociworker.service")["Service"]
    assert service["Type"] == "notify"  # the daemon sends READY=1 (integration test)
    assert service["Delegate"] == "yes" and service["KillMode"] == "mixed"


def test_root_socket_is_the_clients_default_address() -> None:
    # the README's promise: root's `ociworker build --addr` may be left out
    from ociworker.api.client import DEFAULT_ADDR

    sock = unit("system", "ociworker.socket")["Socket"]
    assert f"unix://{sock['ListenStream']}" == DEFAULT_ADDR
    assert sock["SocketMode"] == "0660"  # as `serve` makes its own socket
    service = unit("system", "ociworker.service")["Service"]
    # the state dir is the one systemd makes (StateDirectory= is under /var/lib)
    assert service["StateDirectory"] == "ociworker"
    assert exec_start("system")[exec_start("system").index("--root") + 1] == "/var/lib/ociworker"


def test_user_socket_is_where_a_users_daemon_listens() -> None:
    # README "Rootless": a user's daemon socket is in $XDG_RUNTIME_DIR/ociworker/
    # (%t in a user manager), and only the user may use it
    sock = unit("user", "ociworker.socket")["Socket"]
    assert sock["ListenStream"] == "%t/ociworker/ociworker.sock"
    assert sock["SocketMode"] == "0600"
