"""Registry credentials a client lends its builds (``core.session.Credentials``).

``DockerConfigCredentials`` reads the caller's ``$DOCKER_CONFIG/config.json``
(default ``~/.docker``) the way the docker CLI does, so a user who ran
``docker login`` can pull with us unchanged: ``credHelpers[host]`` first, then
``auths`` (``auth`` base64, ``username``/``password``, ``identitytoken``), then
``credsStore``. Helpers are ``docker-credential-<name> get`` with the server URL
on stdin. In the embedded CLI this runs in the building process; under the
daemon it runs on the client's side of the session, so the worker never reads
anyone's config file.

Values are kept in memory only, per instance (one per build or per session).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ociworker.errors import ConfigError, HostError

#: where ``docker login`` keeps Docker Hub credentials
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")
#: the username docker's helpers report for an identity (refresh) token
_TOKEN_USERNAME = "<token>"
HELPER_TIMEOUT = 30.0


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
    # An identity token replaces the password and is exchanged for registry
    # tokens as an OAuth2 refresh token; an empty username marks it (as BuildKit's).
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return "", token
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


async def run_credential_helper(helper: str, server: str) -> tuple[str, str] | None:
    """Run ``docker-credential-<helper> get`` for ``server``; None when it has none."""
    exe = f"docker-credential-{helper}"
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise HostError(f"credential helper {exe!r} (from docker config) is not on PATH") from None
    except PermissionError:
        raise HostError(f"credential helper {exe!r} is not executable") from None
    try:
        async with asyncio.timeout(HELPER_TIMEOUT):
            stdout, stderr = await proc.communicate(server.encode())
    except TimeoutError:
        raise HostError(f"credential helper {exe!r} timed out") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: no helper outlives us
            proc.kill()
            await proc.wait()
    out = stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        # The helper protocol signals "no credentials" with this text, not an exit code.
        if "credentials not found" in out.lower():
            return None
        err = stderr.decode(errors="replace").strip()
        raise HostError(f"credential helper {exe!r} failed: {out or err}")
    try:
        data = json.loads(out)
        user, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError):
        # Not quoting the output: it may hold the secret.
        raise HostError(f"credential helper {exe!r} printed unexpected output") from None
    return ("" if user == _TOKEN_USERNAME else user), secret


class DockerConfigCredentials:
    """``core.session.Credentials`` over a docker ``config.json``.

    ``config_dir`` defaults to ``$DOCKER_CONFIG`` or ``~/.docker``; a missing
    file means anonymous access everywhere, a broken one is a ``ConfigError``
    on first use rather than a confusing 401 later. Answers are remembered per
    host for the life of the instance, so a helper runs once per build.
    """

    def __init__(self, config_dir: Path | None = None) -> None:
        self._dir = config_dir
        self._config: tuple[dict[str, tuple[str, Any]], dict[str, str], str | None] | None = None
        self._cache: dict[str, tuple[str, str] | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def path(self) -> Path:
        if self._dir is not None:
            return self._dir / "config.json"
        env = os.environ.get("DOCKER_CONFIG")
        return (Path(env) if env else Path.home() / ".docker") / "config.json"

    def _load(self) -> tuple[dict[str, tuple[str, Any]], dict[str, str], str | None]:
        if self._config is not None:
            return self._config
        path = self.path
        try:
            raw = path.read_text()
        except FileNotFoundError:
            raw = "{}"
        except OSError as exc:
            raise ConfigError(f"docker config {path}: {exc.strerror}") from None
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"docker config {path}: invalid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"docker config {path}: want a JSON object")
        auths = config.get("auths")
        auths = {} if auths is None else auths
        helpers = config.get("credHelpers")
        helpers = {} if helpers is None else helpers
        store = config.get("credsStore")
        if not isinstance(auths, dict) or not isinstance(helpers, dict):
            raise ConfigError(f"docker config {path}: 'auths' and 'credHelpers' must be objects")
        self._config = (
            {_hostname_of(k): (k, v) for k, v in auths.items() if isinstance(v, dict)},
            {_hostname_of(k): str(v) for k, v in helpers.items()},
            str(store) if isinstance(store, str) and store else None,
        )
        return self._config

    async def credentials(self, host: str) -> tuple[str, str] | None:
        async with self._locks.setdefault(host, asyncio.Lock()):
            if host not in self._cache:
                self._cache[host] = await self._lookup(host)
            return self._cache[host]

    async def _lookup(self, host: str) -> tuple[str, str] | None:
        auths, helpers, store = self._load()
        keys = _lookup_keys(host)
        for key in keys:
            helper = helpers.get(_hostname_of(key))
            if helper:
                return await run_credential_helper(helper, keys[0])
        for key in keys:
            found = auths.get(_hostname_of(key))
            if found is not None:
                creds = _decode_auth(found[1], found[0])
                if creds is not None:
                    return creds
        if store:
            return await run_credential_helper(store, keys[0])
        return None


class StaticCredentials:
    """Fixed ``host -> (username, secret)`` pairs, e.g. for ``ociworker.Client``
    callers that hold credentials themselves rather than in a docker config."""

    def __init__(self, creds: Mapping[str, tuple[str, str]]) -> None:
        self._creds = dict(creds)

    async def credentials(self, host: str) -> tuple[str, str] | None:
        for key in _lookup_keys(host):
            found = self._creds.get(key)
            if found is not None:
                return found
        return None
