"""Cache mount directories: sharing modes, seeding, subdirs, du and prune (no runtime)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from ociworker.errors import ConfigError
from ociworker.ops.runmount.cache import CacheMounts, CacheSpec


def _spec(cache_id: str, sharing: str = "shared") -> CacheSpec:
    return CacheSpec.from_options(
        {"id": cache_id, "sharing": sharing, "uid": str(os.getuid()), "gid": str(os.getgid())},
        "/t",
    )


async def test_shared_users_get_one_dir_at_once(tmp_path: Path) -> None:
    cm = CacheMounts(tmp_path / "cm")
    async with cm.acquire(_spec("x")) as a, cm.acquire(_spec("x")) as b:
        assert a == b
    async with cm.acquire(_spec("y")) as c:
        assert c != a  # another id, another dir
    # named by a hash, never by the id itself
    cm2 = CacheMounts(tmp_path / "cm2")
    async with cm2.acquire(_spec("../../etc")) as d:
        assert d.parent.parent == tmp_path / "cm2"


async def test_private_users_get_their_own_instance_only_while_both_run(tmp_path: Path) -> None:
    cm = CacheMounts(tmp_path / "cm")
    async with cm.acquire(_spec("p", "private")) as a, cm.acquire(_spec("p", "private")) as b:
        assert a != b
    async with cm.acquire(_spec("p", "private")) as c:
        assert c == a  # a free instance is reused


async def test_locked_users_never_overlap(tmp_path: Path) -> None:
    cm = CacheMounts(tmp_path / "cm")
    events: list[str] = []

    async def user(name: str) -> None:
        async with cm.acquire(_spec("l", "locked")):
            events.append(f"start-{name}")
            await asyncio.sleep(0)  # let the other one try to get in
            await asyncio.sleep(0)
            events.append(f"end-{name}")

    await asyncio.gather(*(user(str(i)) for i in range(4)))
    for start, end in zip(events[::2], events[1::2], strict=True):
        assert end == "end-" + start.removeprefix("start-")


async def test_seed_runs_once_and_source_stays_inside_the_cache(tmp_path: Path) -> None:
    cm = CacheMounts(tmp_path / "cm")
    calls: list[Path] = []

    async def seed(d: Path) -> None:
        calls.append(d)
        (d / "seeded").write_text("s")

    async with cm.acquire(_spec("s"), "/", seed) as a:
        assert (a / "seeded").read_text() == "s"
    async with cm.acquire(_spec("s"), "/", seed):
        pass
    assert len(calls) == 1
    async with cm.acquire(_spec("s"), "/../../../sub") as sub:
        inst = a
        assert sub == inst / "sub" and sub.is_dir()
    # a symlink a step left in the cache resolves inside it too
    (inst / "esc").symlink_to("/")
    async with cm.acquire(_spec("s"), "/esc/etc") as e:
        assert e == inst / "etc"


async def test_usage_and_remove(tmp_path: Path) -> None:
    cm = CacheMounts(tmp_path / "cm")
    async with cm.acquire(_spec("one")) as d:
        (d / "f").write_bytes(b"x" * 10000)
        (u,) = cm.usage()
        assert cm.remove(u.key) == 0  # in use: kept
    (u,) = cm.usage()
    assert u.id == "one" and u.size >= 10000
    assert cm.remove(u.key) >= 10000
    assert cm.usage() == []
    async with cm.acquire(_spec("one")) as again:
        assert list(again.iterdir()) == []  # a fresh cache after prune


def test_bad_sharing_is_refused() -> None:
    with pytest.raises(ConfigError, match="sharing"):
        CacheSpec.from_options({"sharing": "maybe"}, "/t")


def test_steps_racing_to_name_a_new_cache_both_succeed(tmp_path: Path) -> None:
    # Two steps of one process may both find a new cache dir without its id file;
    # each must write its own temp file (a shared pid-named one was renamed away
    # under the other). Racing threads over many fresh dirs hit that window.
    from ociworker.ops.runmount.cache import _ensure_id_dir

    errors: list[BaseException] = []

    def race(d: Path, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            _ensure_id_dir(d, "the-id")
        except BaseException as exc:  # reported below, with the round
            errors.append(exc)

    for n in range(300):
        d = tmp_path / f"c{n}"
        barrier = threading.Barrier(4)
        threads = [threading.Thread(target=race, args=(d, barrier)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"round {n}: {errors[0]!r}"
        assert (d / "id").read_text() == "the-id"
        assert [p.name for p in d.iterdir()] == ["id"]
