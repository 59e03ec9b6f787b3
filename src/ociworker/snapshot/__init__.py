"""Snapshotters: overlayfs (default) and native copies (fallback).

``open_snapshotter`` is the one place that picks between them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Literal

from ociworker.core.mounts import Mount
from ociworker.errors import ConfigError, HostError
from ociworker.fs.mount import FUSE_OVERLAY, mount_all, unmount
from ociworker.fs.userns import in_user_namespace
from ociworker.log import get_logger
from ociworker.snapshot.dirstore import DirSnapshotter
from ociworker.snapshot.native import NativeSnapshotter
from ociworker.snapshot.overlay import FuseOverlaySnapshotter, OverlaySnapshotter

__all__ = [
    "DirSnapshotter",
    "FuseOverlaySnapshotter",
    "NativeSnapshotter",
    "OverlaySnapshotter",
    "open_snapshotter",
    "overlay_supported",
]

_log = get_logger(__name__)

_probed: dict[str, bool] = {}
_probe_lock = threading.Lock()


def _probe(root: Path, userxattr: bool, mount_type: str = "overlay") -> bool:
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix="overlay-probe-"))
    try:
        for d in ("l1", "l2", "upper", "work", "merged"):
            (work / d).mkdir()
        (work / "l1" / "a").write_text("a")
        (work / "l2" / "b").write_text("b")
        m = Mount(
            type=mount_type,
            source="overlay",
            options=(
                f"lowerdir={work / 'l2'}:{work / 'l1'}",
                f"upperdir={work / 'upper'}",
                f"workdir={work / 'work'}",
                *(("userxattr",) if userxattr else ()),
            ),
        )
        try:
            mount_all([m], work / "merged")
        except (HostError, OSError) as exc:
            _log.debug(f"{mount_type} probe failed", root=os.fspath(root), error=str(exc))
            return False
        try:
            # A whiteout in the upper is what layers need; check it really works.
            (work / "merged" / "a").unlink()
            return (work / "merged" / "b").exists() and not (work / "merged" / "a").exists()
        finally:
            unmount(work / "merged")
    finally:
        shutil.rmtree(work, ignore_errors=True)


#: a root where the overlay probe passed since the last boot (see ``overlay_supported``)
PROBED_MARKER = "overlay-probe.ok"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _probe_stamp(userxattr: bool) -> str:
    # what the answer depends on besides the root's filesystem: the kernel that
    # runs (a new one comes with a boot) and whether we are in a user namespace
    return f"{_boot_id()} userxattr={userxattr}\n"


def _passed_before(root: Path, stamp: str) -> bool:
    try:
        return (root / PROBED_MARKER).read_text(encoding="ascii") == stamp and bool(_boot_id())
    except (OSError, ValueError):
        return False


def overlay_supported(root: Path) -> bool:
    """Whether overlayfs with upper and work dirs on ``root``'s filesystem can be
    mounted here. Probed once per root per process; a pass is remembered in the root
    until the next boot, so an embedded build does not pay for a mount and an unmount
    on every start (a failure is probed again each time)."""
    key = os.path.abspath(root)
    with _probe_lock:
        if key not in _probed:
            userxattr = in_user_namespace()
            stamp = _probe_stamp(userxattr)
            ok = _passed_before(Path(key), stamp)
            if not ok:
                ok = _probe(Path(key), userxattr)
                if ok:
                    with contextlib.suppress(OSError):
                        (Path(key) / PROBED_MARKER).write_text(stamp, encoding="ascii")
            _probed[key] = ok
        return _probed[key]


def fuse_overlay_supported(root: Path) -> bool:
    """Whether ``fuse-overlayfs`` is installed and mounts (with a working whiteout)
    on ``root``'s filesystem here. Probed once per root per process."""
    key = "fuse:" + os.path.abspath(root)
    with _probe_lock:
        if key not in _probed:
            found = shutil.which(FUSE_OVERLAY) is not None
            _probed[key] = found and _probe(Path(key[5:]), False, FUSE_OVERLAY)
        return _probed[key]


def open_snapshotter(
    root: Path, kind: Literal["auto", "overlayfs", "fuse-overlayfs", "native"] = "auto"
) -> DirSnapshotter:
    """The snapshotter for ``root``; ``auto`` prefers overlayfs when it works, then
    (in a user namespace: a rootless worker) fuse-overlayfs, then native copies."""
    userxattr = in_user_namespace()
    if kind == "native":
        return _picked(NativeSnapshotter(root), "native: asked for")
    if kind == "overlayfs":
        if not overlay_supported(root):
            raise HostError(
                f"overlayfs snapshotter requested but overlayfs cannot be mounted under {root} "
                "(needs root or CAP_SYS_ADMIN, the overlay module, and a filesystem that "
                "supports overlay upper dirs); use the native snapshotter instead"
            )
        return _picked(OverlaySnapshotter(root, userxattr=userxattr), "overlayfs: asked for")
    if kind == "fuse-overlayfs":
        if not fuse_overlay_supported(root):
            raise HostError(
                f"fuse-overlayfs snapshotter requested but fuse-overlayfs cannot mount under "
                f"{root} (needs the fuse-overlayfs package and a usable /dev/fuse); use the "
                "native snapshotter instead"
            )
        return _picked(FuseOverlaySnapshotter(root), "fuse-overlayfs: asked for")
    if kind != "auto":
        raise ConfigError(
            f"unknown snapshotter {kind!r}: use auto, overlayfs, fuse-overlayfs or native"
        )
    where = "in the user namespace (userxattr)" if userxattr else "here"
    if overlay_supported(root):
        return _picked(
            OverlaySnapshotter(root, userxattr=userxattr),
            f"overlayfs: auto, kernel overlayfs mounts {where}",
        )
    if userxattr and fuse_overlay_supported(root):
        # Only rootless: root, for whom kernel overlayfs failed, would not do
        # better in user space, and its states should not change type.
        return _picked(
            FuseOverlaySnapshotter(root),
            "fuse-overlayfs: auto, kernel overlayfs cannot be mounted in the user namespace",
        )
    _log.warning(
        "overlayfs unavailable, falling back to the native snapshotter (copies each layer)",
        root=os.fspath(root),
    )
    return _picked(
        NativeSnapshotter(root), f"native: auto, kernel overlayfs cannot be mounted {where}"
    )


def _picked(snap: DirSnapshotter, reason: str) -> DirSnapshotter:
    snap.picked = reason
    _log.debug("snapshotter", picked=type(snap).__name__, reason=reason)
    return snap
