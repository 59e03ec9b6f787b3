"""The shared snapshotter suite with real mounts, against overlay and native."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ociworker.fs.mount import HostMounter
from ociworker.snapshot import FuseOverlaySnapshotter, NativeSnapshotter, OverlaySnapshotter
from ociworker.testing.mounter_suite import CHECKS as MOUNTER_CHECKS
from ociworker.testing.mounter_suite import MounterSuiteContext
from ociworker.testing.snapshot_suite import CHECKS, FullSnapshotter, SuiteContext

FACTORIES: dict[str, Callable[[Path], FullSnapshotter]] = {
    "overlay": OverlaySnapshotter,
    # the rootless fallback; as root it mounts the same way (a FUSE mount of root's)
    "fuse-overlayfs": FuseOverlaySnapshotter,
    "native": NativeSnapshotter,
}

# The 600-deep chain exists for overlay's lowerdir limits; native has none and
# would spend minutes copying ever-growing trees (one full copy per layer).
_CASES = [
    (kind, name)
    for kind in sorted(FACTORIES)
    for name in sorted(CHECKS)
    if (kind, name) != ("native", "deep_chain_600")
]


@pytest.mark.parametrize(("kind", "name"), _CASES)
async def test_snapshotter_suite(kind: str, name: str, state_dir: Path, require_root: None) -> None:
    ctx = SuiteContext(
        factory=FACTORIES[kind],
        base=state_dir,
        real_mounts=True,
        copies_parents=kind == "native",
    )
    await CHECKS[name](ctx)


@pytest.mark.parametrize(
    ("kind", "name"), [(k, n) for k in sorted(FACTORIES) for n in MOUNTER_CHECKS]
)
async def test_host_mounter_suite(
    kind: str,
    name: str,
    state_dir: Path,
    require_root: None,
    mounts_under: Callable[[Path], list[Path]],
) -> None:
    snapshots = FACTORIES[kind](state_dir / "snapshots")
    scratch = state_dir / "tmp"
    scratch.mkdir()
    await MOUNTER_CHECKS[name](MounterSuiteContext(snapshots, HostMounter(scratch)))
    assert await snapshots.walk() == []
    assert list(scratch.iterdir()) == []
    assert mounts_under(state_dir) == []
