"""The values of a build request and its answers (pure): what the CLI, the
daemon's client and the controller pass each other, so a remote client needs
none of the controller's machinery to describe a build."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ociworker.core.cacheimport import CacheSpec
from ociworker.core.digest import Digest
from ociworker.core.gitref import is_git_url
from ociworker.core.oci import Descriptor, Platform
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import DEFAULT_LOG_CAP
from ociworker.core.units import go_duration_ns
from ociworker.errors import ConfigError, UnsupportedError

if TYPE_CHECKING:  # paths are values here: the callers do the IO
    from pathlib import Path

#: the state dir when neither --root nor $OCIWORKER_ROOT names one
DEFAULT_ROOT = "/var/lib/ociworker"

#: the names ``docker build --ulimit`` takes (moby's go-units ulimit table)
ULIMIT_NAMES = (
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
)


@dataclass(frozen=True)
class Ulimit:
    """One ``--ulimit NAME=SOFT[:HARD]`` of a build (a process rlimit of every RUN)."""

    name: str
    soft: int
    hard: int

    @property
    def rlimit(self) -> str:
        return "RLIMIT_" + self.name.upper()

    def __str__(self) -> str:
        return f"{self.name}={self.soft}:{self.hard}"

    @classmethod
    def parse(cls, text: str) -> Ulimit:
        """``nofile=1024:2048`` or ``nproc=128`` (hard = soft), as buildx reads them."""
        name, eq, value = text.partition("=")
        if not eq or name not in ULIMIT_NAMES:
            raise ConfigError(
                f"invalid --ulimit {text!r}: want NAME=SOFT[:HARD] with NAME one of "
                + ", ".join(ULIMIT_NAMES)
            )
        soft_s, _, hard_s = value.partition(":")
        try:
            soft = int(soft_s)
            hard = int(hard_s) if hard_s else soft
        except ValueError:
            raise ConfigError(f"invalid --ulimit {text!r}: limits must be integers") from None
        if soft < 0 or hard < 0:
            raise ConfigError(f"invalid --ulimit {text!r}: limits must not be negative")
        if soft > hard:
            raise ConfigError(
                f"invalid --ulimit {text!r}: soft limit {soft} is above hard limit {hard}"
            )
        return cls(name, soft, hard)


#: the least memory a step may be given (Docker's minimum for --memory)
MIN_STEP_MEMORY = 6 << 20


def step_limits(memory: str | int | None, pids: int | None, cpus: float | None) -> dict[str, Any]:
    """The ``WorkerConfig`` fields for the step limits a flag or a config key gave
    (only those given: the others keep their defaults). ``pids`` 0 means no
    limit; ``memory`` is bytes or ``2g``-style text."""
    out: dict[str, Any] = {}
    if memory is not None:
        value = memory if isinstance(memory, int) else parse_ram_size(str(memory))
        if value < MIN_STEP_MEMORY:
            raise ConfigError(f"step memory limit {memory!r} is below the minimum of 6MiB")
        out["step_memory"] = value
    if pids is not None:
        if pids < 0 or (0 < pids < 8):
            raise ConfigError(f"step pids limit {pids} is invalid: want 0 (none) or >= 8")
        out["step_pids"] = pids or None
    if cpus is not None:
        if not cpus > 0:
            raise ConfigError(f"step CPU limit {cpus} is invalid: want a number above 0")
        out["step_cpus"] = float(cpus)
    return out


_RAM_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_ram_size(text: str) -> int:
    """Bytes of ``--shm-size`` (``64m``, ``1g``, ``2GiB``, ``65536``): binary units
    whatever the suffix, as docker's ``units.RAMInBytes`` reads them."""
    s = text.strip().lower()
    num = s.rstrip("kmgtpib")
    unit = s[len(num) :].removesuffix("b").removesuffix("i")
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _RAM_UNITS or value < 0 or not num:
        raise ConfigError(f"invalid size {text!r}: want bytes or e.g. 64m, 1g")
    return int(value * 1024 ** _RAM_UNITS[unit])


#: the prefix of a named DIR context's local source (``local://named:NAME``)
NAMED_LOCAL_PREFIX = "named:"


@dataclass(frozen=True)
class NamedContext:
    """One ``--build-context NAME=VALUE`` (buildx): a DIR, ``docker-image://REF``,
    ``oci-layout://PATH[:TAG|@DIGEST]``, a git URL or an HTTP(S) URL."""

    name: str
    #: "local" | "docker-image" | "oci-layout" | "git" | "url"
    kind: str
    #: the dir, the image reference, the layout's path or the URL
    value: str
    #: oci-layout: the tag ("latest" by default) or ``sha256:...`` digest
    ref: str = ""

    @property
    def raw(self) -> str:
        """The value as the user wrote it (what the daemon's request carries)."""
        if self.kind == "docker-image":
            return "docker-image://" + self.value
        if self.kind == "oci-layout":
            sep = "@" if self.ref.startswith("sha256:") else ":"
            return f"oci-layout://{self.value}{sep}{self.ref}"
        return self.value

    @property
    def local_name(self) -> str:
        return NAMED_LOCAL_PREFIX + self.name

    @classmethod
    def parse(cls, item: str) -> NamedContext:
        """``NAME=VALUE`` as buildx reads ``--build-context``."""
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name or not value:
            raise ConfigError(
                f"invalid --build-context {item!r}: want NAME=DIR|docker-image://REF|"
                "oci-layout://PATH[:TAG|@DIGEST]|GIT_URL|URL"
            )
        return cls.of(name, value)

    @classmethod
    def of(cls, name: str, value: str) -> NamedContext:
        if value.startswith("docker-image://"):
            ref = value.removeprefix("docker-image://")
            if not ref:
                raise ConfigError(f"invalid --build-context {name}={value}: no image reference")
            return cls(name, "docker-image", ref)
        if value.startswith("oci-layout://"):
            rest = value.removeprefix("oci-layout://")
            path, at, digest = rest.partition("@")
            if at:
                if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                    raise ConfigError(
                        f"invalid --build-context {name}={value}: {digest!r} is not a digest"
                    )
                return cls(name, "oci-layout", path, digest)
            head, colon, tag = rest.rpartition(":")
            if colon and "/" not in tag and head:
                path, ref = head, tag
            else:
                path, ref = rest, "latest"
            if not path:
                raise ConfigError(f"invalid --build-context {name}={value}: no layout path")
            return cls(name, "oci-layout", path, ref)
        if is_git_url(value):
            return cls(name, "git", value)
        if value.startswith(("http://", "https://")):
            return cls(name, "url", value)
        if "://" in value:
            raise ConfigError(
                f"invalid --build-context {name}={value}: unsupported scheme "
                "(want a DIR, docker-image://, oci-layout://, a git URL or an HTTP(S) URL)"
            )
        return cls(name, "local", value)


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
    #: ``--ulimit``s and ``--shm-size`` (bytes) for every RUN of the build
    ulimits: tuple[Ulimit, ...] = ()
    shm_size: int | None = None
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
    #: ``--cache-to`` / ``--cache-from`` (``core.cacheimport``), imports in order
    cache_to: tuple[CacheSpec, ...] = ()
    cache_from: tuple[CacheSpec, ...] = ()
    #: ``--annotation [manifest:]KEY=VALUE`` as given (``core.outputs.parse_annotations``)
    annotations: tuple[str, ...] = ()
    #: ``--label``s: added to the image config's labels
    labels: Mapping[str, str] = field(default_factory=dict)
    #: ``--build-context``s by name
    build_contexts: tuple[NamedContext, ...] = ()
    #: ``--platform``s (only the worker's own is built: ``check_platforms``)
    platforms: tuple[str, ...] = ()
    #: ``--pull``: resolve every image at its registry, never from the image store
    pull: bool = False
    #: ``--no-cache-filter``: stages (names or indexes) whose steps ignore the cache
    no_cache_filter: tuple[str, ...] = ()
    #: a context the worker fetches (a git URL ``URL#REF:SUBDIR`` or an http(s)
    #: tarball); ``context`` is then unused and ``dockerfile`` a path inside it
    context_url: str = ""
    #: ``--explain-cache``: after the build, say why each step that ran missed
    explain_cache: bool = False
    #: ``--verify-cache``: before exporting, run every step again with the cache
    #: off in scratch and fail the build if a cached result differs (a false hit)
    verify_cache: bool = False
    #: ``--frontend``: the frontend that reads the definition ("": dockerfile.v0,
    #: or what the Dockerfile's ``# syntax=`` names) and the options it is given
    frontend: str = ""
    frontend_opts: Mapping[str, str] = field(default_factory=dict)


def check_platforms(requested: Sequence[str], worker: Platform) -> None:
    """``--platform`` values (comma-separated lists too): the worker's own
    platform builds; any other is refused clearly (no cross-building yet)."""
    for item in requested:
        for text in item.split(","):
            text = text.strip()
            if not text:
                continue
            try:
                want = Platform.parse(text)
            except ValueError as exc:
                raise ConfigError(f"invalid --platform {text!r}: {exc}") from None
            same = (want.os, want.architecture) == (worker.os, worker.architecture)
            if not same or (want.variant and want.variant != worker.variant):
                raise UnsupportedError(
                    f"--platform {text}: this worker builds {worker} only "
                    "(cross-building is not available yet)"
                )


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
    #: the definition file's bytes, for a frontend other than the Dockerfile's
    #: (``--frontend graph.v1``: a protobuf definition is no text)
    source: bytes = b""


@dataclass(frozen=True)
class BuildResult:
    manifest: Descriptor | None
    config_digest: Digest | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class UsageRecord:
    """One record of ``du`` (BuildKit's ``UsageRecord``): a cache result, a
    cache mount, a synced context, a git checkout or repository, an HTTP download."""

    id: str
    type: str
    size: int
    description: str
    last_used: float
    created: float = 0.0
    #: ids of the records this one is built on (its snapshot's parent)
    parents: tuple[str, ...] = ()
    mutable: bool = False
    #: held by a running build (a lease), so no prune or GC removes it
    in_use: bool = False
    #: other records are built on it: removing it alone frees nothing
    shared: bool = False
    usage_count: int = 0

    @property
    def reclaimable(self) -> bool:
        return not self.in_use

    @property
    def internal(self) -> bool:
        """Kept by ``prune`` without ``--all`` (as BuildKit keeps these)."""
        return self.type in (INTERNAL_TYPE, FRONTEND_TYPE)


CACHE_MOUNT_TYPE = "exec.cachemount"
REGULAR_TYPE = "regular"
LOCAL_SOURCE_TYPE = "source.local"
GIT_CHECKOUT_TYPE = "source.git.checkout"
INTERNAL_TYPE = "internal"
FRONTEND_TYPE = "frontend"
#: BuildKit's record types (client.UsageRecordType*)
RECORD_TYPES = (
    REGULAR_TYPE,
    LOCAL_SOURCE_TYPE,
    GIT_CHECKOUT_TYPE,
    CACHE_MOUNT_TYPE,
    INTERNAL_TYPE,
    FRONTEND_TYPE,
)
#: the issue's short name for git checkouts, accepted as a filter
_TYPE_ALIASES = {"source.git": GIT_CHECKOUT_TYPE}


@dataclass(frozen=True)
class PruneFilter:
    """``prune``/``du --filter`` as buildx: ``type=T``, ``id=ID``, ``until=DURATION``
    (records unused for at least that long), ``description~=TEXT`` (a regular
    expression searched in the description). Several values of one key: any
    of them; several keys: all of them. ``==`` is accepted for ``=``."""

    types: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    until: float | None = None
    descriptions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, items: Sequence[str]) -> PruneFilter:
        types: list[str] = []
        ids: list[str] = []
        descriptions: list[str] = []
        until: float | None = None
        for item in items:
            for part in item.split(","):
                m = re.match(r"^\s*([a-z-]+)\s*(==|=|~=)(.*)$", part)
                if m is None or not m.group(3):
                    raise ConfigError(f"invalid --filter {part!r}: want key=value")
                key, op, value = m.group(1), m.group(2), m.group(3).strip()
                if key == "description" and op == "~=":
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise ConfigError(f"invalid --filter {part!r}: {exc}") from None
                    descriptions.append(value)
                elif op == "~=":
                    raise ConfigError(f"invalid --filter {part!r}: ~= is for description only")
                elif key == "type":
                    value = _TYPE_ALIASES.get(value, value)
                    if value not in RECORD_TYPES:
                        raise ConfigError(
                            f"invalid --filter type={value}: want one of {', '.join(RECORD_TYPES)}"
                        )
                    types.append(value)
                elif key == "id":
                    ids.append(value)
                elif key in ("until", "unused-for"):
                    try:
                        until = parse_duration(value)
                    except ConfigError as exc:
                        raise ConfigError(f"invalid --filter {part!r}: {exc}") from None
                elif key == "description":
                    descriptions.append("^" + re.escape(value) + "$")
                else:
                    raise ConfigError(
                        f"unsupported --filter {key!r} (type, id, until, description~= are)"
                    )
        return cls(tuple(types), tuple(ids), until, tuple(descriptions))

    @property
    def empty(self) -> bool:
        return not self.types and not self.ids and self.until is None and not self.descriptions

    def matches(self, rec: UsageRecord, *, now: float) -> bool:
        """Whether ``rec`` is selected at time ``now`` (seconds since the epoch)."""
        if self.types and rec.type not in self.types:
            return False
        if self.until is not None and rec.last_used > now - self.until:
            return False
        if self.descriptions and not any(re.search(d, rec.description) for d in self.descriptions):
            return False
        # an id as du shows it (a prefix of the hex) or in full
        hexid = rec.id.removeprefix("sha256:")
        return not self.ids or any(
            i in (rec.id, rec.description) or (len(i) >= 12 and hexid.startswith(i))
            for i in self.ids
        )


def parse_duration(value: str) -> float:
    """Seconds from a Go duration as buildx takes them (``48h``, ``1h30m``, ``90s``;
    ``d`` for days too) or a bare number of seconds."""
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    ns = go_duration_ns(text, days=True)
    if ns is None:
        raise ConfigError(f"invalid duration {value!r}: want e.g. 48h, 30m, 1h30m")
    return ns / 10**9
