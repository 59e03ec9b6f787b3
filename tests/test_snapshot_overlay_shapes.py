"""Overlay mount values and mount-option helpers; no mounting, so no root needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ociworker.core.mounts import Mount
from ociworker.errors import ConfigError
from ociworker.fs.mount import (
    MAX_OVERLAY_LOWERS,
    PAGE_SIZE,
    _relative_overlay_data,
    _unescape,
    overlay_data_fits,
)
from ociworker.snapshot import NativeSnapshotter, OverlaySnapshotter, open_snapshotter


async def test_overlay_mount_shapes(tmp_path: Path) -> None:
    s = OverlaySnapshotter(tmp_path)
    snaps = tmp_path / "snapshots"
    assert await s.prepare("a", None) == [
        Mount(type="bind", source=f"{snaps}/1/fs", options=("rbind", "rw"))
    ]
    await s.commit("A", "a")
    assert await s.view("v1", "A") == [
        Mount(type="bind", source=f"{snaps}/1/fs", options=("rbind", "ro"))
    ]
    assert await s.prepare("b", "A") == [
        Mount(
            type="overlay",
            source="overlay",
            options=(f"lowerdir={snaps}/1/fs", f"upperdir={snaps}/3/fs", f"workdir={snaps}/3/work"),
        )
    ]
    await s.commit("B", "b")
    assert await s.view("v2", "B") == [
        Mount(type="overlay", source="overlay", options=(f"lowerdir={snaps}/3/fs:{snaps}/1/fs",))
    ]
    assert await s.view("v0", None) == [
        Mount(type="bind", source=f"{snaps}/5/fs", options=("rbind", "ro"))
    ]
    assert list(await s.mounts("v2")) == list(await s.mounts("v2"))


def test_overlay_root_with_separators_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        OverlaySnapshotter(tmp_path / "a:b")


def test_relative_overlay_data() -> None:
    common, data = _relative_overlay_data(
        ["lowerdir=/r/s/2/fs:/r/s/1/fs", "upperdir=/r/s/3/fs", "workdir=/r/s/3/work", "index=off"]
    )
    assert common == "/r/s"
    assert data == "lowerdir=2/fs:1/fs,upperdir=3/fs,workdir=3/work,index=off"
    # A path equal to the common dir must not collapse to "."
    assert _relative_overlay_data(["lowerdir=/r/a:/r/a/b"]) == ("/r", "lowerdir=a:a/b")


def test_overlay_data_fits() -> None:
    def lower(n: int, width: int) -> Mount:
        dirs = ":".join(f"/{'x' * width}/snapshots/{i}/fs" for i in range(n))
        return Mount(type="overlay", source="overlay", options=(f"lowerdir={dirs}",))

    assert overlay_data_fits(lower(10, 10))
    assert len(",".join(lower(200, 100).options)) > PAGE_SIZE
    assert overlay_data_fits(lower(200, 100))  # only in the relative form
    assert not overlay_data_fits(lower(MAX_OVERLAY_LOWERS + 1, 1))
    assert not overlay_data_fits(lower(1000, 1))  # too long even when relative


def test_mountinfo_unescape() -> None:
    assert _unescape(r"/a\040b\134c\011d") == "/a b\\c\td"


def test_open_native_needs_no_probe(tmp_path: Path) -> None:
    assert isinstance(open_snapshotter(tmp_path, "native"), NativeSnapshotter)
    with pytest.raises(ConfigError):
        open_snapshotter(tmp_path, "zfs")  # type: ignore[arg-type]


_RACER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from ociworker.snapshot import NativeSnapshotter

    async def main():
        s = NativeSnapshotter(Path(sys.argv[1]))
        key = sys.argv[2]
        await s.prepare(key, None)
        go = Path(sys.argv[1]) / "go"
        while not go.exists():
            time.sleep(0.005)
        try:
            await s.commit("same", key)
        except FileExistsError:
            print("lost")
        else:
            print("won")

    asyncio.run(main())
    """
)


def test_two_processes_commit_the_same_name(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(root), key],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for key in ("k1", "k2")
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "go").touch()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["lost", "won"]
