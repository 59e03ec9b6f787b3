"""The id maps of a rootless worker's user namespace (pure).

A non-root user's worker runs as root of a user namespace in which uid 0 is
the user and uids 1..N are the user's subordinate range from ``/etc/subuid``
(``/etc/subgid`` for groups), the layout rootlesskit and podman use: image
files keep their uids (1000 in a layer is 1000 in the namespace) while the
user's own files, owned by 0 inside, stay theirs outside.
"""

from __future__ import annotations

from dataclasses import dataclass

from ociworker.errors import ConfigError


@dataclass(frozen=True)
class IdRange:
    """``count`` ids from ``start`` on the host (a subuid/subgid line)."""

    start: int
    count: int


@dataclass(frozen=True)
class IdMap:
    """One id kind's map: 0 -> ``own``, 1.. -> ``sub``."""

    own: int
    sub: IdRange

    def newidmap_args(self) -> list[str]:
        """The ``newuidmap``/``newgidmap`` triples (inside, outside, count)."""
        return ["0", str(self.own), "1", "1", str(self.sub.start), str(self.sub.count)]

    def to_host(self, inside: int) -> int | None:
        """The host id of namespace id ``inside`` (None: not mapped)."""
        if inside == 0:
            return self.own
        if 1 <= inside <= self.sub.count:
            return self.sub.start + inside - 1
        return None


def parse_subid(text: str, name: str, ident: int) -> IdRange | None:
    """The first range of ``name`` (or of the numeric ``ident``) in a subuid or
    subgid file's ``text``, as shadow's ``newuidmap`` reads it; None if it has none."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or parts[0] not in (name, str(ident)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count > 0 and start >= 0:
            return IdRange(start, count)
    return None


def require_subid(text: str | None, path: str, name: str, ident: int, kind: str) -> IdRange:
    """``parse_subid`` or a ConfigError saying what is missing and the fix."""
    found = parse_subid(text or "", name, ident)
    if found is None:
        raise ConfigError(
            f"rootless: user {name} has no subordinate {kind} range in {path}, which the "
            f"build's user namespace needs; fix (as root): usermod {flag_of(kind)} "
            f"100000-165535 {name}"
        )
    if found.count < 65536:
        # Images use uids up to 65534 (nobody): fewer cannot hold their files.
        raise ConfigError(
            f"rootless: user {name} has only {found.count} subordinate {kind}s in {path} "
            f"(images need 65536); fix (as root): usermod {flag_of(kind)} "
            f"{found.start}-{found.start + 65535} {name}"
        )
    return found


def flag_of(kind: str) -> str:
    """usermod's flag that adds a range of ``kind`` ("uid" or "gid")."""
    return "--add-subuids" if kind == "uid" else "--add-subgids"
