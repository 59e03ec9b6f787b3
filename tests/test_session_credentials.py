"""DockerConfigCredentials: docker's config.json, credential helpers, identity tokens."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from ociworker.errors import ConfigError, HostError
from ociworker.session.credentials import DockerConfigCredentials, StaticCredentials


def _write_config(home: Path, config: object) -> None:
    (home / ".docker").mkdir(parents=True, exist_ok=True)
    (home / ".docker" / "config.json").write_text(json.dumps(config))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    return tmp_path


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_missing_config_means_anonymous(home: Path) -> None:
    assert await DockerConfigCredentials().credentials("reg.example") is None


async def test_auths_entries(home: Path) -> None:
    _write_config(
        home,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _b64("hub:pw:with:colons")},
                "reg.example:5000": {"auth": _b64("u:p")},
                "https://other.example/v2/": {"username": "o", "password": "q"},
                "token.example": {"auth": _b64("u:ignored"), "identitytoken": "refresh-me"},
                "empty.example": {},
            }
        },
    )
    creds = DockerConfigCredentials()
    assert await creds.credentials("docker.io") == ("hub", "pw:with:colons")
    assert await creds.credentials("registry-1.docker.io") == ("hub", "pw:with:colons")
    assert await creds.credentials("reg.example:5000") == ("u", "p")
    assert await creds.credentials("reg.example") is None  # the port is part of the name
    assert await creds.credentials("other.example") == ("o", "q")
    # an identity token wins over the password; the empty username marks it
    assert await creds.credentials("token.example") == ("", "refresh-me")
    assert await creds.credentials("empty.example") is None


async def test_config_dir_argument_and_docker_config_env(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_config(home, {"auths": {"r.io": {"auth": _b64("home:x")}}})
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auths": {"r.io": {"auth": _b64("env:y")}}}))
    assert await DockerConfigCredentials().credentials("r.io") == ("home", "x")
    monkeypatch.setenv("DOCKER_CONFIG", str(other))
    assert await DockerConfigCredentials().credentials("r.io") == ("env", "y")
    assert await DockerConfigCredentials(home / ".docker").credentials("r.io") == ("home", "x")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "invalid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"auths": []}), "must be objects"),
        (json.dumps({"auths": {"r.io": {"auth": "%%%"}}}), "invalid base64"),
        (json.dumps({"auths": {"r.io": {"auth": _b64("nocolon")}}}), "user:password"),
    ],
)
async def test_broken_config_is_a_config_error(home: Path, content: str, needle: str) -> None:
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=needle):
        await DockerConfigCredentials().credentials("r.io")


def _helper(bindir: Path, name: str, script: str) -> None:
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    return d


async def test_cred_helpers_and_store(home: Path, bindir: Path) -> None:
    # The helper echoes the server it was asked about, proving what we sent on stdin,
    # and counts its runs in a file.
    _helper(
        bindir,
        "special",
        f'echo run >> {bindir}/special.runs; read s; echo "{{\\"ServerURL\\":\\"$s\\",'
        '\\"Username\\":\\"sp-$s\\",\\"Secret\\":\\"x\\"}"\n',
    )
    _helper(
        bindir,
        "store",
        'read s; if [ "$s" = known.io ]; then '
        'echo "{\\"Username\\":\\"st\\",\\"Secret\\":\\"y\\"}"; '
        'elif [ "$s" = oauth.io ]; then '
        'echo "{\\"Username\\":\\"<token>\\",\\"Secret\\":\\"idtok\\"}"; '
        "else echo 'credentials not found in native keychain'; exit 1; fi\n",
    )
    _write_config(
        home,
        {
            "auths": {"plain.io": {"auth": _b64("pl:z")}},
            "credHelpers": {"special.io": "special", "https://index.docker.io/v1/": "special"},
            "credsStore": "store",
        },
    )
    creds = DockerConfigCredentials()
    assert await creds.credentials("special.io") == ("sp-special.io", "x")
    assert await creds.credentials("docker.io") == ("sp-https://index.docker.io/v1/", "x")
    assert await creds.credentials("plain.io") == ("pl", "z")  # auths beat the default store
    assert await creds.credentials("known.io") == ("st", "y")
    assert await creds.credentials("oauth.io") == ("", "idtok")  # docker's "<token>" user
    assert await creds.credentials("unknown.io") is None
    # answers are remembered: asking again runs no helper
    assert await creds.credentials("special.io") == ("sp-special.io", "x")
    assert (bindir / "special.runs").read_text().count("run") == 2  # special.io, docker.io


async def test_failing_or_missing_helper_is_a_host_error(home: Path, bindir: Path) -> None:
    _helper(bindir, "broken", "echo boom >&2; exit 3\n")
    _helper(bindir, "chatty", "echo 'Username: u, Secret: hunter2'\n")
    _write_config(home, {"credHelpers": {"a.io": "broken", "b.io": "absent", "c.io": "chatty"}})
    creds = DockerConfigCredentials()
    with pytest.raises(HostError, match="boom"):
        await creds.credentials("a.io")
    with pytest.raises(HostError, match="not on PATH"):
        await creds.credentials("b.io")
    with pytest.raises(HostError, match="unexpected output") as info:
        await creds.credentials("c.io")
    assert "hunter2" not in str(info.value)  # its output may be the secret


async def test_a_hanging_helper_times_out_and_is_killed(
    home: Path, bindir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = bindir / "pid"
    _helper(bindir, "hang", f"echo $$ > {pidfile}; exec sleep 60\n")
    _write_config(home, {"credHelpers": {"h.io": "hang"}})
    monkeypatch.setattr("ociworker.session.credentials.HELPER_TIMEOUT", 0.5)
    with pytest.raises(HostError, match="timed out"):
        await DockerConfigCredentials().credentials("h.io")
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not left running


async def test_static_credentials_know_docker_hub_aliases() -> None:
    creds = StaticCredentials({"docker.io": ("u", "p"), "r.io": ("a", "b")})
    assert await creds.credentials("registry-1.docker.io") == ("u", "p")
    assert await creds.credentials("r.io") == ("a", "b")
    assert await creds.credentials("x.io") is None
