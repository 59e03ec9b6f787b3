"""Overlay specifics with real mounts: page-sized options, flattening, mount helpers,
and the snapshotter factory's probe."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from ociworker.core.mounts import Mount
from ociworker.errors import HostError
from ociworker.fs.mount import PAGE_SIZE, mount_all, mounted, unmount
from ociworker.snapshot import (
    NativeSnapshotter,
    OverlaySnapshotter,
    open_snapshotter,
    overlay_supported,
)
from ociworker.snapshot.overlay import FLATTEN_EVERY

pytestmark = pytest.mark.usefixtures("require_root")


async def _chain(s: OverlaySnapshotter, depth: int) -> str:
    parent: str | None = None
    for i in range(depth):
        (mounts,) = await s.prepare(f"k{i}", parent)
        upper = mounts.option("upperdir") or mounts.source
        Path(upper, f"f{i}").write_text(str(i))
        await s.commit(f"layer-{i}", f"k{i}")
        parent = f"layer-{i}"
    assert parent is not None
    return parent


async def test_long_lowerdir_is_mounted_with_relative_paths(state_dir: Path) -> None:
    s = OverlaySnapshotter(state_dir / "root")
    top = await _chain(s, 200)
    (m,) = await s.view("v", top)
    lowers = (m.option("lowerdir") or "").split(":")
    # The value others consume keeps absolute paths and every layer...
    assert len(lowers) == 200 and all(os.path.isabs(p) for p in lowers)
    # ...and is far too long for one mount(2) page, so mount_all must shorten it.
    assert len(",".join(m.options)) > PAGE_SIZE
    async with mounted([m], state_dir) as path:
        assert sorted(os.listdir(path)) == sorted(f"f{i}" for i in range(200))
        assert (path / "f0").read_text() == "0" and (path / "f199").read_text() == "199"


async def test_deep_chain_is_flattened_at_checkpoints(state_dir: Path) -> None:
    s = OverlaySnapshotter(state_dir / "root")
    top = await _chain(s, 600)
    (m,) = await s.prepare("child", top)
    lowers = (m.option("lowerdir") or "").split(":")
    assert len(lowers) <= FLATTEN_EVERY + 1
    assert lowers[-1].endswith("/flat") and lowers[0].endswith("/fs")
    assert m.option("upperdir") is not None
    flats = sorted(p.parent.name for p in (state_dir / "root" / "snapshots").glob("*/flat"))
    # Layer i is row id i + 1; checkpoints every FLATTEN_EVERY layers, only as needed.
    assert flats == sorted(str(d) for d in range(FLATTEN_EVERY * 3, 600, FLATTEN_EVERY))
    async with mounted([m], state_dir) as path:
        (path / "f3").unlink()  # a whiteout over a file that lives in a flat copy
        assert len(os.listdir(path)) == 599
        assert (path / "f5").read_text() == "5"
    # The same mounts come back for the same key, reusing the cached copies.
    assert list(await s.mounts("child")) == [m]
    await s.remove("child")
    assert sorted(p.parent.name for p in (state_dir / "root" / "snapshots").glob("*/flat")) == flats


async def test_mounted_cleans_up_after_errors_and_cancellation(
    state_dir: Path, mounts_under: Callable[[Path], list[Path]]
) -> None:
    src = state_dir / "src"
    src.mkdir()
    (src / "x").write_text("x")
    bind = [Mount(type="bind", source=str(src), options=("rbind", "ro"))]
    scratch = state_dir / "scratch"
    scratch.mkdir()

    with pytest.raises(RuntimeError):
        async with mounted(bind, scratch) as path:
            assert (path / "x").read_text() == "x"
            with pytest.raises(OSError):
                (path / "y").write_text("read-only")
            raise RuntimeError("boom")
    assert os.listdir(scratch) == [] and mounts_under(scratch) == []

    entered = asyncio.Event()

    async def hold() -> None:
        async with mounted(bind, scratch):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(scratch) == [] and mounts_under(scratch) == []

    with pytest.raises(HostError):
        async with mounted([Mount(type="bind", source=str(state_dir / "missing"))], scratch):
            pass
    assert os.listdir(scratch) == []


async def test_unmount_detaches_a_busy_mount(
    state_dir: Path, mounts_under: Callable[[Path], list[Path]]
) -> None:
    src, target = state_dir / "src", state_dir / "target"
    src.mkdir()
    target.mkdir()
    (src / "f").write_text("held open")
    mount_all([Mount(type="bind", source=str(src), options=("rbind", "rw"))], target)
    with open(target / "f") as held:
        unmount(target)
        assert mounts_under(target) == []
        assert held.read() == "held open"  # lazily detached, still readable
    assert os.listdir(target) == []


async def test_mount_all_is_all_or_nothing(
    state_dir: Path, mounts_under: Callable[[Path], list[Path]]
) -> None:
    src, target = state_dir / "src", state_dir / "target"
    (src / "sub").mkdir(parents=True)
    target.mkdir()
    good = Mount(type="bind", source=str(src), options=("rbind", "rw"))
    bad = Mount(type="bind", source=str(state_dir / "missing"), target="/sub")
    with pytest.raises(HostError, match="missing"):
        mount_all([good, bad], target)
    assert mounts_under(target) == []


def test_factory_picks_overlay_and_falls_back_where_it_cannot_work(
    state_dir: Path, mounts_under: Callable[[Path], list[Path]]
) -> None:
    assert overlay_supported(state_dir / "ext")
    assert isinstance(open_snapshotter(state_dir / "ext", "auto"), OverlaySnapshotter)
    assert isinstance(open_snapshotter(state_dir / "ext", "native"), NativeSnapshotter)
    # A writable overlayfs cannot host overlay upper dirs itself: a real host
    # filesystem without overlay support, no mock needed.
    o = state_dir / "o"
    for d in ("lower", "upper", "work", "merged"):
        (o / d).mkdir(parents=True)
    mount_all(
        [
            Mount(
                type="overlay",
                source="overlay",
                options=(
                    f"lowerdir={o / 'lower'}",
                    f"upperdir={o / 'upper'}",
                    f"workdir={o / 'work'}",
                ),
            )
        ],
        o / "merged",
    )
    try:
        root = o / "merged" / "root"
        assert not overlay_supported(root)
        with pytest.raises(HostError, match="overlayfs"):
            open_snapshotter(root, "overlayfs")
        with structlog.testing.capture_logs() as logs:
            assert isinstance(open_snapshotter(root, "auto"), NativeSnapshotter)
        # one warning (the debug line says which snapshotter was picked, for --debug)
        assert [e["log_level"] for e in logs if e["log_level"] != "debug"] == ["warning"]
        assert os.listdir(root) == []  # the probe cleaned up after itself
    finally:
        unmount(o / "merged")
    assert mounts_under(state_dir) == []
