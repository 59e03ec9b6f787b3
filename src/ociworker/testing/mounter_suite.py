"""The shared suite of ``snapshot.base.Mounter``: what the op handlers rely on.

Run against ``fs.mount.HostMounter`` on the native and overlay snapshotters
(``integration/test_snapshot_suite.py``, as root) and against the unit tests'
``testing.fakes.MemoryMounter`` on ``MemorySnapshotter`` (``tests/test_fakes_suites.py``).
Each check removes every snapshot it made, so it also proves nothing stays mounted.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ociworker.snapshot.base import Mounter
from ociworker.testing.snapshot_suite import FullSnapshotter


@dataclass
class MounterSuiteContext:
    snapshots: FullSnapshotter
    mounter: Mounter


class _Boom(Exception):
    pass


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


async def check_writes_seen_when_mounted_again(ctx: MounterSuiteContext) -> None:
    mounts = await ctx.snapshots.prepare("suite-active", None)
    async with ctx.mounter.mounted(mounts) as root:
        (root / "dir").mkdir()
        (root / "dir" / "file").write_text("written through the mount")
    async with ctx.mounter.mounted(await ctx.snapshots.mounts("suite-active")) as again:
        _expect(
            (again / "dir" / "file").read_text() == "written through the mount",
            "a write through a writable mount is lost when the snapshot is mounted again",
        )
    await ctx.snapshots.remove("suite-active")


async def check_view_of_commit_sees_writes(ctx: MounterSuiteContext) -> None:
    mounts = await ctx.snapshots.prepare("suite-active", None)
    async with ctx.mounter.mounted(mounts) as root:
        (root / "kept").write_text("before commit")
    await ctx.snapshots.commit("suite-committed", "suite-active")
    view = await ctx.snapshots.view("suite-view", "suite-committed")
    async with ctx.mounter.mounted(view) as seen:
        _expect(
            (seen / "kept").read_text() == "before commit",
            "a view of the committed snapshot misses what was written before the commit",
        )
    await ctx.snapshots.remove("suite-view")
    await ctx.snapshots.remove("suite-committed")


async def check_mount_dir_gone_after_exit(ctx: MounterSuiteContext) -> None:
    mounts = await ctx.snapshots.prepare("suite-active", None)
    async with ctx.mounter.mounted(mounts) as root:
        _expect(root.is_dir(), f"the mount dir {root} is not a directory")
        (root / "f").write_text("x")
    _expect(not os.path.lexists(root), f"the mount dir {root} is still there after exit")
    await ctx.snapshots.remove("suite-active")


async def check_mount_dir_gone_after_error(ctx: MounterSuiteContext) -> None:
    mounts = await ctx.snapshots.prepare("suite-active", None)
    seen: list[Path] = []
    try:
        async with ctx.mounter.mounted(mounts) as root:
            seen.append(root)
            (root / "f").write_text("x")
            raise _Boom
    except _Boom:
        pass
    else:
        raise AssertionError("the error raised inside the mount was swallowed")
    _expect(not os.path.lexists(seen[0]), f"the mount dir {seen[0]} is left after an error")
    await ctx.snapshots.remove("suite-active")


CHECKS: dict[str, Callable[[MounterSuiteContext], Awaitable[None]]] = {
    "writes_seen_when_mounted_again": check_writes_seen_when_mounted_again,
    "view_of_commit_sees_writes": check_view_of_commit_sees_writes,
    "mount_dir_gone_after_exit": check_mount_dir_gone_after_exit,
    "mount_dir_gone_after_error": check_mount_dir_gone_after_error,
}
