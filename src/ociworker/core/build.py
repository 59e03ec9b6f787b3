"""The values of a build request and its answers (pure): what the CLI, the
daemon's client and the controller pass each other, so a remote client needs
none of the controller's machinery to describe a build."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ociworker.core.digest import Digest
from ociworker.core.oci import Descriptor
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import DEFAULT_LOG_CAP
from ociworker.errors import ConfigError

if TYPE_CHECKING:  # paths are values here: the callers do the IO
    from pathlib import Path

#: the state dir when neither --root nor $OCIWORKER_ROOT names one
DEFAULT_ROOT = "/var/lib/ociworker"


@dataclass(frozen=True)
class BuildRequest:
    context: Path
    dockerfile: Path | None = None
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str = ""
    outputs: tuple[OutputSpec, ...] = ()
    no_cache: bool = False
    #: RUN steps' network: default (a sandbox of the worker's), none, host
    network: str = "default"
    #: ("NAME", "IP") for every RUN step's /etc/hosts (``--add-host``)
    extra_hosts: tuple[tuple[str, str], ...] = ()
    iidfile: Path | None = None
    metadata_file: Path | None = None
    #: bytes of log kept per step (BuildKit's max-log-size); <= 0: no cap
    log_cap: int = DEFAULT_LOG_CAP
    #: make the image even with no output asking for it (a remote client's
    #: iidfile / metadata file, written on its side from the result)
    want_image: bool = False
    #: entitlements the build asks for (``--allow``); a step gets one only if
    #: the worker grants it too (``core.entitlements``)
    allow: tuple[str, ...] = ()


def parse_add_host(value: str) -> tuple[str, str]:
    """``--add-host NAME:IP`` (or ``NAME=IP``, an IPv6 address maybe in brackets),
    as buildx reads it; ``(NAME, IP)``."""
    # "=" first: buildx accepts it because an IPv6 address is full of ":"
    sep = "=" if "=" in value else ":"
    name, found, ip = value.partition(sep)
    ip = ip.strip()
    if ip.startswith("[") and ip.endswith("]"):
        ip = ip[1:-1]
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ConfigError(f"invalid --add-host {value!r}: {ip!r} is not an IP address") from None
    if not found or not name or any(c.isspace() for c in name):
        raise ConfigError(f"invalid --add-host {value!r}: want NAME:IP")
    return name, ip


@dataclass(frozen=True)
class BuildDefinition:
    """What the frontend reads: the Dockerfile's text and name, and the context's
    ignore patterns. The caller reads the files (``session.context``), so the
    frontend and the controller never open one."""

    dockerfile: str
    filename: str = "Dockerfile"
    ignore_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildResult:
    manifest: Descriptor | None
    config_digest: Digest | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class UsageRecord:
    id: str
    type: str
    size: int
    description: str
    last_used: float


CACHE_MOUNT_TYPE = "exec.cachemount"


@dataclass(frozen=True)
class PruneFilter:
    """``prune --filter``: ``type=exec.cachemount`` and/or ``id=ID`` (as buildx)."""

    types: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str]) -> PruneFilter:
        types: list[str] = []
        ids: list[str] = []
        for item in items:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not value:
                raise ConfigError(f"invalid prune filter {item!r}: want key=value")
            if key == "type":
                if value != CACHE_MOUNT_TYPE:
                    raise ConfigError(
                        f"prune --filter type={value} is not supported "
                        f"(only type={CACHE_MOUNT_TYPE})"
                    )
                types.append(value)
            elif key == "id":
                ids.append(value)
            else:
                raise ConfigError(f"prune --filter {key}=... is not supported (use type or id)")
        return cls(tuple(types), tuple(ids))

    @property
    def empty(self) -> bool:
        return not self.types and not self.ids

    def matches(self, rec: UsageRecord) -> bool:
        if self.types and rec.type not in self.types:
            return False
        # an id as du shows it (a prefix of the hex) or in full
        hexid = rec.id.removeprefix("sha256:")
        return not self.ids or any(
            i in (rec.id, rec.description) or (len(i) >= 12 and hexid.startswith(i))
            for i in self.ids
        )
