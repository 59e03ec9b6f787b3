"""GC policies and prune selection (``core.gc``): pure, no disk."""

from __future__ import annotations

import pytest

from ociworker.core.build import PruneFilter, UsageRecord
from ociworker.core.gc import (
    DiskSpace,
    GCPolicy,
    default_policies,
    gc_config,
    prune_selection,
    select,
)
from ociworker.errors import ConfigError

MB = 1000**2
NOW = 1_000_000.0


def rec(
    name: str,
    size: int,
    age: float,
    *,
    type: str = "regular",
    parents: tuple[str, ...] = (),
    in_use: bool = False,
    shared: bool = False,
) -> UsageRecord:
    return UsageRecord(
        name,
        type,
        size,
        f"RUN {name}",
        NOW - age,
        created=NOW - age,
        parents=parents,
        in_use=in_use,
        shared=shared,
    )


def ids(records: list[UsageRecord]) -> list[str]:
    return [r.id for r in records]


def test_max_used_space_removes_least_recently_used_until_under_it() -> None:
    records = [rec(f"r{i}", 10 * MB, age=100 - i) for i in range(10)]  # r9 newest
    policy = GCPolicy(all=True, max_used_space=45 * MB)
    gone = select(records, [policy], disk=DiskSpace(10**12, 10**11), now=NOW)
    assert ids(gone) == ["r0", "r1", "r2", "r3", "r4", "r5"]  # 100 MB -> 40 MB
    assert sum(r.size for r in records) - sum(r.size for r in gone) <= 45 * MB


def test_under_the_cap_nothing_goes() -> None:
    records = [rec(f"r{i}", MB, age=i) for i in range(5)]
    policy = GCPolicy(all=True, max_used_space=5 * MB)
    assert select(records, [policy], disk=DiskSpace(10**12, 10**11), now=NOW) == []


def test_in_use_records_and_what_they_are_built_on_are_never_removed() -> None:
    base = rec("base", 10 * MB, age=1000, shared=True)
    child = rec("child", 10 * MB, age=900, parents=("base",), in_use=True)
    other = rec("other", 10 * MB, age=10)
    gone = prune_selection(
        [base, child, other], PruneFilter(), all=True, keep_storage=0, keep_duration=0, now=NOW
    )
    assert ids(gone) == ["other"]


def test_a_parent_goes_after_its_children_even_when_used_earlier() -> None:
    base = rec("base", 5 * MB, age=1000, shared=True)
    child = rec("child", 5 * MB, age=500, parents=("base",))
    newer = rec("newer", 5 * MB, age=700)
    policy = GCPolicy(all=True, max_used_space=10 * MB)
    gone = select([base, child, newer], [policy], disk=DiskSpace(10**12, 10**11), now=NOW)
    # base counts as used when child was: newer (700 s ago) is older than both
    assert ids(gone) == ["newer"]


def test_internal_records_are_kept_without_all_and_keep_duration_keeps_recent() -> None:
    repo = rec("repo", MB, age=10**6, type="internal")
    old = rec("old", MB, age=3 * 3600)
    new = rec("new", MB, age=60)
    gone = prune_selection(
        [repo, old, new], PruneFilter(), all=False, keep_storage=0, keep_duration=3600, now=NOW
    )
    assert ids(gone) == ["old"]
    gone = prune_selection(
        [repo, old, new], PruneFilter(), all=True, keep_storage=0, keep_duration=0, now=NOW
    )
    assert sorted(ids(gone)) == ["new", "old", "repo"]


def test_keep_storage_prunes_down_to_it() -> None:
    records = [rec(f"r{i}", 10 * MB, age=100 - i) for i in range(4)]
    gone = prune_selection(
        records, PruneFilter(), all=True, keep_storage=25 * MB, keep_duration=0, now=NOW
    )
    assert ids(gone) == ["r0", "r1"]


def test_min_free_space_frees_the_difference_but_keeps_reserved_space() -> None:
    records = [rec(f"r{i}", 10 * MB, age=100 - i) for i in range(6)]
    policy = GCPolicy(all=True, min_free_space=30 * MB, reserved_space=35 * MB)
    # 5 MB free, 30 wanted: 25 MB to free (60 -> 35 MB); a third record would leave
    # 30 MB, below the reserved 35, so it stops at 40
    gone = select(records, [policy], disk=DiskSpace(10**12, 5 * MB), now=NOW)
    assert ids(gone) == ["r0", "r1"]


def test_filters_select_by_type_until_and_description() -> None:
    mount = rec("m", MB, age=7200, type="exec.cachemount")
    run = rec("apt-get install", MB, age=7200)
    fresh = rec("x", MB, age=60)
    flt = PruneFilter.parse(["type=exec.cachemount"])
    assert [r.id for r in (mount, run, fresh) if flt.matches(r, now=NOW)] == ["m"]
    flt = PruneFilter.parse(["until=1h"])
    assert [r.id for r in (mount, run, fresh) if flt.matches(r, now=NOW)] == [
        "m",
        "apt-get install",
    ]
    flt = PruneFilter.parse(["description~=apt-.*install"])
    assert [r.id for r in (mount, run, fresh) if flt.matches(r, now=NOW)] == ["apt-get install"]
    flt = PruneFilter.parse(["type=source.git"])  # the short name of source.git.checkout
    assert flt.types == ("source.git.checkout",)


def test_default_policies_are_buildkits() -> None:
    total = 100 * 1000**3
    transient, old, rest, everything = default_policies(total)
    assert set(transient.filter.types) == {"source.local", "exec.cachemount", "source.git.checkout"}
    assert transient.keep_duration == 48 * 3600 and transient.max_used_space == 512 * MB
    assert old.keep_duration == 1440 * 3600
    for p in (old, rest, everything):
        assert p.reserved_space == 10 * 1000**3  # 10%, at most 10 GB
        assert p.max_used_space == 60 * 1000**3  # 60%, at most 100 GB
        assert p.min_free_space == 20 * 1000**3  # 20%
    assert everything.all and not rest.all
    big = default_policies(10 * 1000**4)[1]
    assert big.reserved_space == 10 * 1000**3 and big.max_used_space == 100 * 1000**3


def test_gc_config_reads_buildkitd_tables_and_refuses_unknown_keys() -> None:
    cfg = gc_config(
        {
            "oci": {
                "gc": True,
                "gcpolicy": [
                    {"filters": ["type=exec.cachemount"], "keepDuration": "48h", "keepBytes": 512},
                    {"all": True, "maxUsedSpace": "64MiB", "minFreeSpace": "1GB"},
                ],
            }
        },
        "config file x",
    )
    first, second = cfg.policies
    assert first.keep_duration == 48 * 3600 and first.reserved_space == 512
    assert second.all and second.max_used_space == 64 * 1024**2
    assert second.min_free_space == 1000**3
    assert cfg.effective(10**12) == cfg.policies
    assert gc_config({}, "x").effective(10**12) == default_policies(10**12)
    for bad in (
        {"oci": {"gcpolicy": [{"keepStorage": "1GB"}]}},
        {"oci": {"gcpolicy": [{"keepDuration": "two days"}]}},
        {"oci": {"gckeepstorage": 1}},
        {"containerd": {}},
        {"oci": {"gcpolicy": [{"filters": ["type=image"]}]}},
    ):
        with pytest.raises(ConfigError):
            gc_config(bad, "config file x")
