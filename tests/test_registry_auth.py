from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from ociworker.errors import ConfigError, HostError
from ociworker.registry.auth import (
    Challenge,
    docker_config_credentials,
    parse_www_authenticate,
)


def test_parse_bearer_challenge_with_commas_in_scope() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push"'
    )
    [ch] = parse_www_authenticate(header)
    assert ch.scheme == "bearer"
    assert ch.get("realm") == "https://auth.example/token"
    assert ch.get("service") == "reg.example"
    assert ch.get("scope") == "repository:a/b:pull,push"
    assert ch.get("missing") is None


def test_parse_several_challenges_and_escapes() -> None:
    header = 'Basic realm="Registry \\"x\\"", Bearer realm=https://t/, error=insufficient_scope'
    chs = parse_www_authenticate(header)
    assert [c.scheme for c in chs] == ["basic", "bearer"]
    assert chs[0].get("realm") == 'Registry "x"'
    assert chs[1] == Challenge("bearer", (("realm", "https://t/"), ("error", "insufficient_scope")))


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


def test_missing_config_means_anonymous(home: Path) -> None:
    assert docker_config_credentials()("reg.example") is None


def test_auths_entries(home: Path) -> None:
    _write_config(
        home,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _b64("hub:pw:with:colons")},
                "reg.example:5000": {"auth": _b64("u:p")},
                "https://other.example/v2/": {"username": "o", "password": "q"},
                "empty.example": {},
            }
        },
    )
    creds = docker_config_credentials()
    assert creds("docker.io") == ("hub", "pw:with:colons")
    assert creds("reg.example:5000") == ("u", "p")
    assert creds("reg.example") is None  # the port is part of the name
    assert creds("other.example") == ("o", "q")
    assert creds("empty.example") is None


def test_docker_config_env_wins(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_config(home, {"auths": {"r.io": {"auth": _b64("home:x")}}})
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auths": {"r.io": {"auth": _b64("env:y")}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(other))
    assert docker_config_credentials()("r.io") == ("env", "y")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "invalid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"auths": {"r.io": {"auth": "%%%"}}}), "invalid base64"),
        (json.dumps({"auths": {"r.io": {"auth": _b64("nocolon")}}}), "user:password"),
    ],
)
def test_broken_config_is_a_config_error(home: Path, content: str, needle: str) -> None:
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=needle):
        docker_config_credentials()("r.io")


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


def test_cred_helpers_and_store(home: Path, bindir: Path) -> None:
    # The helper echoes the server it was asked about, proving what we sent on stdin.
    _helper(
        bindir,
        "special",
        'read s; echo "{\\"ServerURL\\":\\"$s\\",'
        '\\"Username\\":\\"sp-$s\\",\\"Secret\\":\\"x\\"}"\n',
    )
    _helper(
        bindir,
        "store",
        'read s; if [ "$s" = known.io ]; then '
        'echo "{\\"Username\\":\\"st\\",\\"Secret\\":\\"y\\"}"; '
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
    creds = docker_config_credentials()
    assert creds("special.io") == ("sp-special.io", "x")
    assert creds("docker.io") == ("sp-https://index.docker.io/v1/", "x")
    assert creds("plain.io") == ("pl", "z")  # auths beat the default store
    assert creds("known.io") == ("st", "y")
    assert creds("unknown.io") is None


def test_failing_or_missing_helper_is_a_host_error(home: Path, bindir: Path) -> None:
    _helper(bindir, "broken", "echo boom >&2; exit 3\n")
    _write_config(home, {"credHelpers": {"a.io": "broken", "b.io": "absent"}})
    creds = docker_config_credentials()
    with pytest.raises(HostError, match="boom"):
        creds("a.io")
    with pytest.raises(HostError, match="not on PATH"):
        creds("b.io")
