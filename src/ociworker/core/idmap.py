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


#: what a container image needs: uids 0..65535 (nobody is 65534), as BuildKit's rootless
#: docs ask ("should contain >= 65536 sub-IDs")
SUBID_MIN = 65536
#: where a new range starts when nobody holds one (useradd's SUB_UID_MIN default)
SUBID_FIRST = 100000


@dataclass(frozen=True)
class SubIdEntry:
    """One line of /etc/subuid or /etc/subgid: ``owner`` is a name or a numeric uid, as
    written."""

    owner: str
    start: int
    count: int

    @property
    def end(self) -> int:  # exclusive
        return self.start + self.count


def parse_subid(text: str) -> list[SubIdEntry]:
    """The entries of /etc/subuid or /etc/subgid (``owner:start:count``). Lines that are
    not entries (comments, junk) are skipped, as shadow's own parser does."""
    out: list[SubIdEntry] = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or not parts[0] or line.lstrip().startswith("#"):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            out.append(SubIdEntry(parts[0], start, count))
    return out


def ranges_of(entries: list[SubIdEntry], user: str, uid: int) -> list[SubIdEntry]:
    """``user``'s entries, in file order: newuidmap accepts one naming the user or its
    numeric uid."""
    return [e for e in entries if e.owner in (user, str(uid))]


def first_range(text: str, name: str, ident: int) -> IdRange | None:
    """The range the worker maps: the first of ``name`` (or of the numeric ``ident``) in a
    subuid or subgid file's ``text``; None if it has none."""
    mine = ranges_of(parse_subid(text), name, ident)
    return IdRange(mine[0].start, mine[0].count) if mine else None


def free_range(*texts: str | None, count: int = SUBID_MIN) -> tuple[int, int]:
    """A range of ``count`` ids (first, last) that no entry of any given file overlaps: after
    the highest one, so both files can take the same range."""
    ends = [e.end for t in texts if t for e in parse_subid(t)]
    first = max([SUBID_FIRST, *ends])
    return first, first + count - 1


def subid_fix(kind: str, name: str, ident: int, subuid: str | None, subgid: str | None) -> str:
    """The ``usermod`` command (run as root) that gives ``name`` a usable ``kind`` ("uid" or
    "gid") range: a free one (overlapping nobody's uids nor gids) added, and a first range
    too small to map an image removed, since the worker maps the first range only."""
    first, last = free_range(subuid, subgid)
    add = f"{flag_of(kind)} {first}-{last} {name}"
    text = subuid if kind == "uid" else subgid
    mine = ranges_of(parse_subid(text or ""), name, ident)
    if mine and mine[0].count < SUBID_MIN:
        head = mine[0]
        return f"usermod --del-sub{kind}s {head.start}-{head.end - 1} {add}"
    return f"usermod {add}"


def require_subid(
    kind: str, name: str, ident: int, subuid: str | None, subgid: str | None, path: str
) -> IdRange:
    """The first ``kind`` range of ``name`` (from the file texts, None: no such file), or a
    ConfigError saying what is missing and the fix (the one ``ociworker doctor`` gives)."""
    text = subuid if kind == "uid" else subgid
    found = first_range(text or "", name, ident)
    fix = subid_fix(kind, name, ident, subuid, subgid)
    if found is None:
        raise ConfigError(
            f"rootless: user {name} has no subordinate {kind} range in {path}, which the "
            f"build's user namespace needs; fix (as root): {fix}"
        )
    if found.count < SUBID_MIN:
        # Images use uids up to 65534 (nobody): fewer cannot hold their files.
        raise ConfigError(
            f"rootless: the first subordinate {kind} range of user {name} in {path} holds "
            f"{found.count} ids (images need {SUBID_MIN}); fix (as root): {fix}"
        )
    return found


def flag_of(kind: str) -> str:
    """usermod's flag that adds a range of ``kind`` ("uid" or "gid")."""
    return "--add-subuids" if kind == "uid" else "--add-subgids"
