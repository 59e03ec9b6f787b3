"""The local secrets provider: ``--secret id=ID,src=FILE`` / ``--secret id=ID,env=VAR``.

Parsing follows buildx: ``type=file|env``, ``id``, ``src``/``source``, ``env``;
with neither a file nor a variable, the id names an environment variable when
one of that name is set, else a file. A file is checked when the build starts
(a typo fails fast) but read only when a step asks for it, and never cached.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ociworker.errors import ConfigError

#: BuildKit refuses bigger secrets (they travel in one message and sit on a tmpfs)
MAX_SECRET_SIZE = 500 * 1024


@dataclass(frozen=True)
class SecretSource:
    id: str
    file: str = ""
    env: str = ""

    @classmethod
    def parse(cls, text: str) -> SecretSource:
        typ = ""
        secret_id = file = env = ""
        for field in text.split(","):
            key, eq, value = field.partition("=")
            key = key.strip().lower()
            if not eq:
                raise ConfigError(f"invalid --secret {text!r}: {field!r} is not key=value")
            if key == "type":
                if value not in ("file", "env"):
                    raise ConfigError(f"unsupported secret type {value!r} in --secret {text!r}")
                typ = value
            elif key == "id":
                secret_id = value
            elif key in ("src", "source"):
                file = value
            elif key == "env":
                env = value
            else:
                raise ConfigError(f"unexpected key {key!r} in --secret {text!r}")
        if typ == "env" and not env:
            env, file = file, ""
        if not secret_id:
            raise ConfigError(f"invalid --secret {text!r}: secret missing ID")
        return cls(secret_id, file, env)


class LocalSecrets:
    """``core.session.Secrets`` served from this process's files and environment."""

    def __init__(
        self, sources: Sequence[SecretSource], environ: Mapping[str, str] | None = None
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._sources: dict[str, SecretSource] = {}
        for s in sources:
            if not s.file and not s.env:
                s = (
                    SecretSource(s.id, env=s.id)
                    if s.id in self._environ
                    else SecretSource(s.id, file=s.id)
                )
            if s.file:
                path = Path(s.file).expanduser()
                try:
                    size = path.stat().st_size
                except OSError as exc:
                    raise ConfigError(
                        f"secret {s.id}: failed to stat {s.file}: {exc.strerror}"
                    ) from None
                if size > MAX_SECRET_SIZE:
                    raise ConfigError(
                        f"secret {s.id}: {s.file} is too big ({size} bytes, max {MAX_SECRET_SIZE})"
                    )
                s = SecretSource(s.id, file=str(path.absolute()))
            self._sources[s.id] = s

    async def get_secret(self, secret_id: str) -> bytes | None:
        s = self._sources.get(secret_id)
        if s is None:
            return None
        if s.env:
            value = self._environ.get(s.env)
            return None if value is None else value.encode()
        try:
            with open(s.file, "rb") as f:
                data = f.read(MAX_SECRET_SIZE + 1)
        except OSError as exc:
            raise ConfigError(f"secret {secret_id}: cannot read {s.file}: {exc.strerror}") from None
        if len(data) > MAX_SECRET_SIZE:
            raise ConfigError(f"secret {secret_id}: {s.file} is bigger than {MAX_SECRET_SIZE}")
        return data
