"""Start-up recovery of a state dir whose last user died without cleaning up.

A daemon killed with SIGKILL leaves what its builds held: containers still
running under the runtime's ``--root``, overlay mounts of the rootfs and of
views, bundles, active snapshots. Whoever holds the root's lock (so nothing
else can be using them) calls ``recover`` before the first build.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from ociworker.fs.mount import mountpoints_under, unmount
from ociworker.log import get_logger
from ociworker.worker import Worker

_log = get_logger(__name__)


def _kill_containers(runtime_dir: Path) -> int:
    """Kill and delete every container the runtimes still know under our root."""
    n = 0
    if not runtime_dir.is_dir():
        return 0
    for state in runtime_dir.iterdir():
        binary = shutil.which(state.name)
        if binary is None or not state.is_dir():
            continue
        got = subprocess.run(
            [binary, f"--root={state}", "list", "-q"], capture_output=True, text=True, timeout=30
        )
        for cid in got.stdout.split():
            subprocess.run(
                [binary, f"--root={state}", "kill", cid, "KILL"], capture_output=True, timeout=30
            )
            subprocess.run(
                [binary, f"--root={state}", "delete", "--force", cid],
                capture_output=True,
                timeout=30,
            )
            n += 1
    return n


def _unmount_below(root: Path) -> int:
    """Unmount everything strictly below ``root`` (the root may itself be a mount)."""
    base = os.path.realpath(root)
    points = [p for p in mountpoints_under(root) if p != base]
    for point in reversed(points):
        with contextlib.suppress(FileNotFoundError):
            unmount(Path(point))
    return len(points)


def _empty_dir(d: Path) -> None:
    if not d.is_dir():
        return
    for entry in d.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


async def recover(worker: Worker) -> dict[str, int]:
    """Make ``worker.root`` consistent after an unclean stop; counts of what was found."""
    root = worker.root
    containers = await asyncio.to_thread(_kill_containers, root / "executor" / "runtime")
    mounts = await asyncio.to_thread(_unmount_below, root)
    # bundles and scratch mount points belong to builds that no longer exist
    for d in (root / "executor" / "bundles", worker.tmp):
        await asyncio.to_thread(_empty_dir, d)
    netns = root / "executor" / "netns"
    if netns.is_dir():
        from ociworker.executor.network import remove_netns

        for ns in list(netns.iterdir()):
            await asyncio.to_thread(remove_netns, ns)
    active = 0
    for info in await worker.snapshots.walk():
        if info.kind != "committed":
            await worker.snapshots.remove(info.key)
            active += 1
    found = {"containers": containers, "mounts": mounts, "active_snapshots": active}
    if any(found.values()):
        _log.warning("recovered state left by an unclean stop", **found)
    return found
