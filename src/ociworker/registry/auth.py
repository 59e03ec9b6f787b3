"""Registry credentials and authentication challenges.

``docker_config_credentials`` turns ``~/.docker/config.json`` into a credentials
provider, so a user who ran ``docker login`` can pull with us unchanged.
``parse_www_authenticate`` is the sans-IO half of the bearer-token flow; the
client does the requests.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ociworker.errors import ConfigError, HostError

#: host (as written in an image reference, e.g. ``docker.io``, ``127.0.0.1:5000``)
#: -> (username, password), or None for anonymous access
CredentialsProvider = Callable[[str], "tuple[str, str] | None"]

#: where ``docker login`` keeps Docker Hub credentials
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header (RFC 7235)."""

    scheme: str  # lower case: "bearer", "basic"
    params: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# Unquoted values are looser than RFC 7235 tokens: some registries send bare URLs.
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*({_QUOTED}|[^\s,\"]+)\s*(,|$)")
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse ``Bearer realm="...",service="...",scope="a:b:pull,push"``.

    Quoted values may contain commas (push scopes do), so a naive split on ","
    would break them; params are read one ``key=value`` at a time instead.
    """
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        if header[pos] in " ,":
            pos += 1
            continue
        m = _SCHEME_RE.match(header, pos)
        if m is None:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: list[tuple[str, str]] = []
        while pos < len(header):
            p = _PARAM_RE.match(header, pos)
            if p is None:
                break
            value = p.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params.append((p.group(1).lower(), value))
            pos = p.end()
        challenges.append(Challenge(scheme=scheme, params=tuple(params)))
    return challenges


def _hostname_of(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``, as docker's ConvertToHostname."""
    for prefix in ("http://", "https://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.split("/", 1)[0]


def _lookup_keys(host: str) -> list[str]:
    if host in _DOCKER_HUB_HOSTS:
        return [DOCKER_HUB_AUTH_KEY, *_DOCKER_HUB_HOSTS]
    return [host]


def _decode_auth(entry: Mapping[str, Any], key: str) -> tuple[str, str] | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            text = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"docker config: invalid base64 'auth' for {key!r}") from None
        user, sep, password = text.partition(":")
        if not sep:
            raise ConfigError(f"docker config: 'auth' for {key!r} is not 'user:password'")
        return user, password
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return name, secret
    return None


def run_credential_helper(helper: str, server: str) -> tuple[str, str] | None:
    """Run ``docker-credential-<helper> get`` for ``server``; None when it has none."""
    exe = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [exe, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        raise HostError(f"credential helper {exe!r} (from docker config) is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"credential helper {exe!r} timed out") from None
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        # The helper protocol signals "no credentials" with this text, not an exit code.
        if "credentials not found" in out.lower():
            return None
        err = proc.stderr.decode(errors="replace").strip()
        raise HostError(f"credential helper {exe!r} failed: {out or err}")
    try:
        data = json.loads(out)
        user, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise HostError(f"credential helper {exe!r} printed unexpected output") from None
    return user, secret


class DockerConfigCredentials:
    """A ``CredentialsProvider`` over a parsed docker ``config.json``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        auths = config.get("auths") or {}
        helpers = config.get("credHelpers") or {}
        store = config.get("credsStore")
        if not isinstance(auths, dict) or not isinstance(helpers, dict):
            raise ConfigError("docker config: 'auths' and 'credHelpers' must be objects")
        self._auths = {_hostname_of(k): (k, v) for k, v in auths.items() if isinstance(v, dict)}
        self._helpers = {_hostname_of(k): str(v) for k, v in helpers.items()}
        self._store = str(store) if isinstance(store, str) and store else None

    def __call__(self, host: str) -> tuple[str, str] | None:
        keys = _lookup_keys(host)
        for key in keys:
            helper = self._helpers.get(_hostname_of(key))
            if helper:
                return run_credential_helper(helper, keys[0])
        for key in keys:
            found = self._auths.get(_hostname_of(key))
            if found is not None:
                creds = _decode_auth(found[1], found[0])
                if creds is not None:
                    return creds
        if self._store:
            return run_credential_helper(self._store, keys[0])
        return None


def docker_config_path() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    base = Path(env) if env else Path.home() / ".docker"
    return base / "config.json"


def docker_config_credentials(path: Path | None = None) -> CredentialsProvider:
    """A provider reading ``$DOCKER_CONFIG/config.json`` (default ``~/.docker``).

    A missing file means anonymous access everywhere; a broken one is a
    ``ConfigError`` now rather than a confusing 401 later.
    """
    path = path or docker_config_path()
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return DockerConfigCredentials({})
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"docker config {path}: invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"docker config {path}: want a JSON object")
    return DockerConfigCredentials(config)
