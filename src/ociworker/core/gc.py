"""GC policies and prune selection (pure): which records go, given their sizes,
when each was last used, what a running build holds and how full the disk is.

A policy is buildkitd's ``[[worker.oci.gcpolicy]]``:

- ``filters``: only the records these select (``PruneFilter`` syntax);
- ``all``: internal and frontend records too (otherwise they are kept);
- ``keepDuration``: records used within this long are kept;
- ``reservedSpace``: never prune below this many bytes of cache;
- ``maxUsedSpace``: prune once the cache is above this;
- ``minFreeSpace``: prune while the disk has less free than this.

A policy without any space setting removes every record it selects (that
``keepDuration`` does not keep); with only ``reservedSpace`` (or the old
``keepBytes``) it prunes down to it. Records go least recently used first, so
the newest-used survive; records in use are never candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ociworker.core.build import (
    CACHE_MOUNT_TYPE,
    GIT_CHECKOUT_TYPE,
    LOCAL_SOURCE_TYPE,
    PruneFilter,
    UsageRecord,
    parse_duration,
)
from ociworker.core.units import parse_size
from ociworker.errors import ConfigError

GB = 1000**3


@dataclass(frozen=True)
class GCPolicy:
    all: bool = False
    filter: PruneFilter = field(default_factory=PruneFilter)
    keep_duration: float = 0.0
    reserved_space: int = 0
    max_used_space: int = 0
    min_free_space: int = 0

    @property
    def sized(self) -> bool:
        return bool(self.max_used_space or self.min_free_space)


@dataclass(frozen=True)
class PruneOptions:
    """``prune``'s flags (buildx's): ``--all``, ``--filter``, ``--keep-storage``,
    ``--keep-duration``."""

    filter: PruneFilter = field(default_factory=PruneFilter)
    all: bool = False
    keep_storage: int = 0
    keep_duration: float = 0.0


@dataclass(frozen=True)
class DiskSpace:
    """The filesystem holding the root: its size and what is free on it."""

    total: int
    free: int
    #: bytes the root's stores hold outside every record (blobs no record owns,
    #: such as pulled images' manifests; each snapshot's own bookkeeping): they
    #: count towards maxUsedSpace, though no GC rule can remove them
    other: int = 0


def default_policies(disk_total: int) -> tuple[GCPolicy, ...]:
    """BuildKit's defaults (v0.17+, ``config.DefaultGCPolicy``): reserved space
    10% of the disk (at most 10 GB), max used space 60% (at most 100 GB), min
    free space 20% of the disk; transient records (contexts, cache mounts, git
    checkouts) unused for 48 h first, capped at 512 MB, then anything unused
    for 60 days, then everything but internal records, then everything."""
    reserved = min(disk_total // 10, 10 * GB)
    max_used = min(disk_total * 60 // 100, 100 * GB)
    min_free = disk_total * 20 // 100
    space = GCPolicy(reserved_space=reserved, max_used_space=max_used, min_free_space=min_free)
    transient = PruneFilter(types=(LOCAL_SOURCE_TYPE, CACHE_MOUNT_TYPE, GIT_CHECKOUT_TYPE))
    return (
        GCPolicy(filter=transient, keep_duration=48 * 3600, max_used_space=512 * 1000**2),
        dataclasses.replace(space, keep_duration=1440 * 3600),
        space,
        dataclasses.replace(space, all=True),
    )


_KEYS = {
    "all",
    "filters",
    "keepDuration",
    "reservedSpace",
    "keepBytes",
    "maxUsedSpace",
    "minFreeSpace",
}


def parse_policies(tables: object, where: str) -> tuple[GCPolicy, ...]:
    """``[[worker.oci.gcpolicy]]`` tables (buildkitd's keys; sizes as ``"2GB"`` or
    bytes, durations as ``"48h"`` or seconds); an unknown key is refused."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{where}: gcpolicy must be tables [[worker.oci.gcpolicy]]")
    return tuple(_policy(t, f"{where}: gcpolicy #{n}") for n, t in enumerate(tables))


def _policy(t: Mapping[str, object], where: str) -> GCPolicy:
    unknown = sorted(set(t) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    filters = t.get("filters", [])
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        raise ConfigError(f"{where}: filters must be a list of strings")
    all_ = t.get("all", False)
    if not isinstance(all_, bool):
        raise ConfigError(f"{where}: all must be true or false")
    return GCPolicy(
        all=all_,
        filter=PruneFilter.parse(filters),
        keep_duration=_duration(t.get("keepDuration", 0), where),
        reserved_space=_size(t.get("reservedSpace", t.get("keepBytes", 0)), where),
        max_used_space=_size(t.get("maxUsedSpace", 0), where),
        min_free_space=_size(t.get("minFreeSpace", 0), where),
    )


def _size(v: object, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ConfigError(f"{where}: invalid size {v!r}")
    return parse_size(v)


def _duration(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ConfigError(f"{where}: invalid duration {v!r}")
    return parse_duration(str(v))


def select(
    records: Sequence[UsageRecord],
    policies: Iterable[GCPolicy],
    *,
    disk: DiskSpace,
    now: float,
) -> list[UsageRecord]:
    """The records the policies remove, in order (applied one after the other,
    each seeing what the ones before it freed)."""
    left = list(records)
    removed: list[UsageRecord] = []
    free = disk.free
    for policy in policies:
        gone = select_one(left, policy, free=free, now=now, other=disk.other)
        ids = {r.id for r in gone}
        left = [r for r in left if r.id not in ids]
        free += sum(r.size for r in gone)
        removed.extend(gone)
    return removed


def select_one(
    records: Sequence[UsageRecord], policy: GCPolicy, *, free: int, now: float, other: int = 0
) -> list[UsageRecord]:
    used = sum(r.size for r in records) + other
    last, held = _through_children(records)
    candidates = sorted(
        (
            r
            for r in records
            if r.id not in held
            and (policy.all or not r.internal)
            and policy.filter.matches(r, now=now)
            and not (policy.keep_duration and last[r.id] > now - policy.keep_duration)
        ),
        # a record others are built on goes after them: alone it frees nothing
        key=lambda r: (last[r.id], r.shared, r.created),
    )
    if policy.sized:
        target = used
        if policy.max_used_space and used > policy.max_used_space:
            target = policy.max_used_space
        if policy.min_free_space and free < policy.min_free_space:
            target = min(target, used - (policy.min_free_space - free))
        target = max(target, policy.reserved_space)
    elif policy.reserved_space:
        target = policy.reserved_space
    else:
        return candidates
    floor = policy.reserved_space if policy.sized else 0
    out: list[UsageRecord] = []
    for r in candidates:
        # reservedSpace is a floor for the space rules: never collect below it
        if used <= target or used - r.size < floor:
            break
        out.append(r)
        used -= r.size
    return out


def _through_children(
    records: Sequence[UsageRecord],
) -> tuple[dict[str, float], set[str]]:
    """Each record's last use counting its descendants' (a parent is used
    whenever a child is), and the ids held by a running build, directly or as
    the parent of a record one holds."""
    by_id = {r.id: r for r in records}
    last = {r.id: r.last_used for r in records}
    held: set[str] = set()
    for r in records:
        seen: set[str] = set()
        stack = list(r.parents)
        if r.in_use:
            held.add(r.id)
        while stack:
            pid = stack.pop()
            if pid in seen or pid not in by_id:
                continue
            seen.add(pid)
            last[pid] = max(last[pid], r.last_used)
            if r.in_use:
                held.add(pid)
            stack.extend(by_id[pid].parents)
    return last, held


def prune_selection(
    records: Sequence[UsageRecord],
    flt: PruneFilter,
    *,
    all: bool,
    keep_storage: int,
    keep_duration: float,
    now: float,
) -> list[UsageRecord]:
    """``prune``'s selection: a one-off policy from its flags."""
    policy = GCPolicy(all=all, filter=flt, keep_duration=keep_duration, reserved_space=keep_storage)
    return select_one(records, policy, free=0, now=now)


@dataclass(frozen=True)
class GCConfig:
    """buildkitd's ``[worker.oci]`` GC keys: ``gc`` (on unless false) and its
    ``[[worker.oci.gcpolicy]]`` tables (none: BuildKit's defaults for the disk)."""

    enabled: bool = True
    policies: tuple[GCPolicy, ...] = ()

    def effective(self, disk_total: int) -> tuple[GCPolicy, ...]:
        return self.policies or default_policies(disk_total)


def gc_config(worker_table: object, where: str) -> GCConfig:
    """The GC part of a config file's ``[worker]`` table; other worker keys are refused."""
    if not isinstance(worker_table, dict):
        raise ConfigError(f"{where}: worker must be a table [worker.oci]")
    unknown = sorted(set(worker_table) - {"oci"})
    if unknown:
        raise ConfigError(f"{where}: unsupported [worker] table(s) {', '.join(unknown)}")
    oci = worker_table.get("oci", {})
    if not isinstance(oci, dict):
        raise ConfigError(f"{where}: [worker.oci] must be a table")
    unknown = sorted(set(oci) - {"gc", "gcpolicy"})
    if unknown:
        raise ConfigError(
            f"{where}: [worker.oci]: unsupported key(s) {', '.join(unknown)} (gc and gcpolicy are)"
        )
    enabled = oci.get("gc", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: [worker.oci] gc must be true or false")
    policies = parse_policies(oci.get("gcpolicy", []), where)
    return GCConfig(enabled, policies)
