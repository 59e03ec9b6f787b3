"""Comparer and applier on real kernel overlayfs mounts (root only).

The reference for every layer is the kernel itself: after applying our layers
to a fresh tree, that tree must equal the overlay's merged view.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ociworker.content.store import ContentStore
from ociworker.core.mounts import Mount
from ociworker.core.oci import Layer
from ociworker.diff import CompressionOpts, LayerApplier, LayerComparer, write_dir_layer

# overlayfs, mknod and trusted xattrs need root; without it the tests fail (conftest's
# require_root), they do not skip
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_root")]

NS = 1_000_000_000

Mounter = Callable[[str, Path], None]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mounter]:
    mounted: list[Path] = []

    def do(options: str, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(target)], check=True
        )
        mounted.append(target)

    yield do
    for target in reversed(mounted):
        if os.path.ismount(target):
            subprocess.run(["umount", str(target)], check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            extra: tuple[Any, ...] = ()
            if stat.S_ISREG(st.st_mode):
                extra = (hashlib.sha256(p.read_bytes()).hexdigest(),)
                groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                extra = (os.readlink(p),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (st.st_rdev,)
            xattrs = tuple(
                (k, os.getxattr(p, k, follow_symlinks=False))
                for k in sorted(os.listxattr(p, follow_symlinks=False))
                if not k.startswith("trusted.overlay.")
            )
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns // NS,
                xattrs,
                *extra,
            )
    for names in groups.values():
        if len(names) > 1:
            for n in names:
                out[n] = (*out[n], tuple(sorted(names)))
    return out


def make_base(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "gone").write_bytes(b"deleted later")
    (root / "opaque" / "deep").mkdir(parents=True)
    (root / "opaque" / "a").write_bytes(b"a")
    (root / "opaque" / "deep" / "b").write_bytes(b"b")
    (root / "moved" / "inner").mkdir(parents=True)
    (root / "moved" / "inner" / "data").write_bytes(b"data")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(50_000))
    os.chmod(root / "bin" / "tool", 0o755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-alias")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    os.chown(root / "etc" / "passwd", 1000, 1001)
    os.setxattr(root / "bin" / "tool", "trusted.ociworker-test", b"kept")
    os.setxattr(root / "bin" / "tool", "security.capability", _cap_net_raw())
    (root / "lnk").symlink_to("etc/passwd")


def _cap_net_raw() -> bytes:
    # vfs_cap_data v2, effective bit set, CAP_NET_RAW (13) permitted
    import struct

    return struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def change_through(merged: Path) -> None:
    """Edit a mounted overlay like a RUN step would."""
    (merged / "etc" / "gone").unlink()
    (merged / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/bash\n")
    (merged / "etc" / "new").write_bytes(b"new")
    os.chmod(merged / "etc", 0o750)
    subprocess.run(["rm", "-rf", str(merged / "opaque")], check=True)
    (merged / "opaque").mkdir()
    (merged / "opaque" / "fresh").write_bytes(b"fresh")
    os.setxattr(merged / "lnk", "trusted.on-symlink", b"s", follow_symlinks=False)
    os.setxattr(merged / "etc" / "new", "user.note", b"\x00\xffbinary")
    (merged / "bin" / "tool").write_bytes(b"patched")  # through one name of a hardlink pair
    os.mknod(merged / "tty", 0o620 | stat.S_IFCHR, os.makedev(5, 0))
    os.link(merged / "etc" / "new", merged / "etc" / "new-link")


def tar_members(store: ContentStore, layer: Layer) -> list[tarfile.TarInfo]:
    import gzip

    raw = gzip.decompress(store.read(layer.descriptor.digest))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return tf.getmembers()


async def test_overlay_upperdir_fast_path(
    tmp_path: Path, store: ContentStore, mount: Mounter
) -> None:
    base, upper, work = tmp_path / "base", tmp_path / "upper", tmp_path / "work"
    make_base(base)
    upper.mkdir()
    work.mkdir()
    rw = f"lowerdir={base},upperdir={upper},workdir={work}"
    mount(rw, tmp_path / "merged")
    change_through(tmp_path / "merged")
    umount(tmp_path / "merged")

    # the kernel really wrote a whiteout device and an opaque xattr
    assert os.lstat(upper / "etc" / "gone").st_rdev == 0
    assert os.getxattr(upper / "opaque", "trusted.overlay.opaque") == b"y"

    comparer = LayerComparer(store, scratch_dir=tmp_path / "scratch")
    active = [
        Mount("overlay", "overlay", (f"lowerdir={base}", f"upperdir={upper}", f"workdir={work}"))
    ]
    layer = await comparer.compare(
        [Mount("bind", str(base), ("rbind", "ro"))], active, CompressionOpts()
    )
    members = {m.name: m for m in tar_members(store, layer)}
    assert "etc/.wh.gone" in members
    assert "opaque/.wh..wh..opq" in members
    assert "moved" not in members and "bin/tool-alias" not in members
    assert members["etc/new-link"].islnk()
    assert members["tty"].ischr() and (members["tty"].devmajor, members["tty"].devminor) == (5, 0)
    for m in members.values():
        assert not any("overlay" in k for k in m.pax_headers), m.name
    assert members["lnk"].pax_headers["SCHILY.xattr.trusted.on-symlink"] == "s"

    mount(f"ro,lowerdir={upper}:{base}", tmp_path / "view")
    want = snapshot(tmp_path / "view")

    # 1. on a plain directory (native snapshotter / bind)
    applier = LayerApplier(store, scratch_dir=tmp_path / "scratch")
    target = tmp_path / "target"
    target.mkdir()
    base_layer = write_dir_layer(store, base, CompressionOpts())
    await applier.apply(base_layer.descriptor, [Mount("bind", str(target), ("rbind", "rw"))])
    diff_id = await applier.apply(layer.descriptor, [Mount("bind", str(target), ("rbind", "rw"))])
    assert diff_id == layer.diff_id
    assert snapshot(target) == want

    # 2. on an active overlay snapshot of the same base
    up2, wk2 = tmp_path / "up2", tmp_path / "wk2"
    up2.mkdir()
    wk2.mkdir()
    snap = [Mount("overlay", "overlay", (f"lowerdir={base}", f"upperdir={up2}", f"workdir={wk2}"))]
    assert await applier.apply(layer.descriptor, snap) == layer.diff_id
    mount(f"ro,lowerdir={up2}:{base}", tmp_path / "view2")
    assert snapshot(tmp_path / "view2") == want
    assert os.listdir(tmp_path / "scratch") == []


async def test_redirect_dir_falls_back_to_double_walk(
    tmp_path: Path, store: ContentStore, mount: Mounter
) -> None:
    base, upper, work = tmp_path / "base", tmp_path / "upper", tmp_path / "work"
    make_base(base)
    upper.mkdir()
    work.mkdir()
    opts = f"lowerdir={base},upperdir={upper},workdir={work},redirect_dir=on,index=off"
    mount(opts, tmp_path / "merged")
    os.rename(tmp_path / "merged" / "moved", tmp_path / "merged" / "renamed")
    umount(tmp_path / "merged")
    # the upperdir holds only a pointer to the lower dir, not its contents
    assert os.listdir(upper / "renamed") == []
    assert os.getxattr(upper / "renamed", "trusted.overlay.redirect")

    active = Mount(
        "overlay",
        "overlay",
        (
            f"lowerdir={base}",
            f"upperdir={upper}",
            f"workdir={work}",
            "redirect_dir=on",
            "index=off",
        ),
    )
    layer = await LayerComparer(store, scratch_dir=tmp_path / "scratch").compare(
        [Mount("bind", str(base), ("rbind", "ro"))], [active], CompressionOpts()
    )
    names = [m.name for m in tar_members(store, layer)]
    assert names == [".wh.moved", "renamed", "renamed/inner", "renamed/inner/data"]

    mount(f"ro,redirect_dir=on,lowerdir={upper}:{base}", tmp_path / "view")
    target = tmp_path / "target"
    target.mkdir()
    applier = LayerApplier(store)
    bind = [Mount("bind", str(target), ("rbind", "rw"))]
    await applier.apply(write_dir_layer(store, base, CompressionOpts()).descriptor, bind)
    await applier.apply(layer.descriptor, bind)
    assert snapshot(target) == snapshot(tmp_path / "view")


async def test_double_walk_over_multi_layer_overlay_view(
    tmp_path: Path, store: ContentStore, mount: Mounter
) -> None:
    # lower: a two-layer read-only overlay view whose top layer holds whiteouts
    base, l2, work = tmp_path / "base", tmp_path / "l2", tmp_path / "work"
    make_base(base)
    l2.mkdir()
    work.mkdir()
    mount(f"lowerdir={base},upperdir={l2},workdir={work}", tmp_path / "m1")
    change_through(tmp_path / "m1")
    umount(tmp_path / "m1")
    lower = [Mount("overlay", "overlay", (f"lowerdir={l2}:{base}",))]

    # upper: a native-style full copy of that view, then edited
    mount(f"ro,lowerdir={l2}:{base}", tmp_path / "v1")
    upper = tmp_path / "upper"
    subprocess.run(["cp", "-a", str(tmp_path / "v1"), str(upper)], check=True)
    (upper / "etc" / "passwd").unlink()
    (upper / "opaque" / "fresh").write_bytes(b"changed!")
    (upper / "added").mkdir()

    layer = await LayerComparer(store, scratch_dir=tmp_path / "scratch").compare(
        lower, [Mount("bind", str(upper), ("rbind", "rw"))], CompressionOpts()
    )
    names = [m.name for m in tar_members(store, layer)]
    assert names == ["added", "etc", "etc/.wh.passwd", "opaque", "opaque/fresh"]
    assert os.listdir(tmp_path / "scratch") == []

    # replay base + l2 + this layer onto an empty dir and compare with upper
    comparer = LayerComparer(store)
    l2_layer = await comparer.compare(
        [Mount("bind", str(base), ("rbind", "ro"))],
        [Mount("overlay", "overlay", (f"lowerdir={base}", f"upperdir={l2}", f"workdir={work}"))],
        CompressionOpts("zstd"),
    )
    target = tmp_path / "target"
    target.mkdir()
    applier = LayerApplier(store)
    bind = [Mount("bind", str(target), ("rbind", "rw"))]
    for d in (write_dir_layer(store, base, CompressionOpts()), l2_layer, layer):
        await applier.apply(d.descriptor, bind)
    got, want = snapshot(target), snapshot(upper)
    # cp -a of an overlay view cannot keep hardlinks that span layers; compare without them
    assert {k: v[:7] for k, v in got.items()} == {k: v[:7] for k, v in want.items()}


# --- the fast path writes what the double walk writes -------------------------------


def layer_entries(store: ContentStore, layer: Layer) -> list[tuple[Any, ...]]:
    return [
        (m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname, m.pax_headers)
        for m in tar_members(store, layer)
    ]


def two_lower_layers(tmp_path: Path, mount: Mounter) -> tuple[Path, Path]:
    """base, and l2 on it (made through the kernel): l2 deletes d and d2 (whiteouts)."""
    base, l2, work = tmp_path / "base", tmp_path / "l2", tmp_path / "l2-work"
    make_base(base)
    for rel in ("d/old", "d2/old", "srv/gone", "var/log/old", "usr/lib/libc.so", "mode/x"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(rel.encode())
    l2.mkdir()
    work.mkdir()
    mount(f"lowerdir={base},upperdir={l2},workdir={work}", tmp_path / "m-l2")
    subprocess.run(["rm", "-rf", str(tmp_path / "m-l2" / "d"), str(tmp_path / "m-l2" / "d2")])
    umount(tmp_path / "m-l2")
    assert os.lstat(l2 / "d").st_rdev == 0 and stat.S_ISCHR(os.lstat(l2 / "d").st_mode)
    return base, l2


async def fast_and_double(
    tmp_path: Path, store: ContentStore, mount: Mounter, change: Callable[[Path], None]
) -> tuple[Layer, Layer, Path]:
    """The layer of ``change`` made through the kernel on l2:base, by the fast path
    (the active snapshot's mounts) and by the double walk (its merged view as a bind);
    and that merged view."""
    base, l2 = two_lower_layers(tmp_path, mount)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    active = f"lowerdir={l2}:{base},upperdir={upper},workdir={work}"
    mount(active, tmp_path / "merged")
    change(tmp_path / "merged")
    umount(tmp_path / "merged")
    view = tmp_path / "view"
    mount(f"ro,lowerdir={upper}:{l2}:{base}", view)

    lower = [Mount("overlay", "overlay", (f"lowerdir={l2}:{base}",))]
    comparer = LayerComparer(store, scratch_dir=tmp_path / "scratch")
    fast = await comparer.compare(
        lower, [Mount("overlay", "overlay", tuple(active.split(",")))], CompressionOpts()
    )
    double = await comparer.compare(
        lower, [Mount("bind", str(view), ("rbind", "ro"))], CompressionOpts()
    )
    return fast, double, upper


async def test_fast_path_skips_dirs_the_kernel_only_copied_up(
    tmp_path: Path, store: ContentStore, mount: Mounter
) -> None:
    def change(m: Path) -> None:
        (m / "etc" / "tmp").write_bytes(b"")  # etc copied up, then nothing left below it
        (m / "etc" / "tmp").unlink()
        (m / "var" / "log" / "tmp").mkdir()  # the same, two levels deep
        (m / "var" / "log" / "tmp").rmdir()
        (m / "usr" / "lib" / "new.so").write_bytes(b"new")  # parents written once
        (m / "usr" / "lib" / "two.so").write_bytes(b"two")
        os.chmod(m / "mode", 0o750)
        (m / "newdir").mkdir()
        (m / "srv" / "gone").unlink()
        # hidden by l2's whiteouts, made again with the metadata base has
        (m / "d").mkdir(0o755)
        (m / "d2").mkdir(0o755)
        (m / "d2" / "f").write_bytes(b"f")

    fast, double, upper = await fast_and_double(tmp_path, store, mount, change)
    # what the kernel left: copied-up dirs with nothing below, re-made dirs not opaque
    assert os.listdir(upper / "etc") == [] and os.listdir(upper / "var" / "log") == []
    assert "trusted.overlay.opaque" not in os.listxattr(upper / "d")
    names = [e[0] for e in layer_entries(store, fast)]
    assert names == [
        "d",
        "d2",
        "d2/f",
        "mode",
        "newdir",
        "srv",
        "srv/.wh.gone",
        "usr",
        "usr/lib",
        "usr/lib/new.so",
        "usr/lib/two.so",
    ]
    assert layer_entries(store, fast) == layer_entries(store, double)
    assert fast.diff_id == double.diff_id


async def test_opaque_dir_fast_path_and_double_walk_give_the_same_tree(
    tmp_path: Path, store: ContentStore, mount: Mounter
) -> None:
    def change(m: Path) -> None:
        subprocess.run(["rm", "-rf", str(m / "opaque")], check=True)
        (m / "opaque").mkdir(0o755)
        (m / "opaque" / "fresh").write_bytes(b"fresh")

    fast, double, upper = await fast_and_double(tmp_path, store, mount, change)
    assert os.getxattr(upper / "opaque", "trusted.overlay.opaque") == b"y"
    # the fast path keeps the kernel's opaque marker, the double walk names each deletion
    # (as BuildKit's differ does); both give the same tree
    assert [e[0] for e in layer_entries(store, fast)] == [
        "opaque",
        "opaque/.wh..wh..opq",
        "opaque/fresh",
    ]
    assert [e[0] for e in layer_entries(store, double)] == [
        "opaque",
        "opaque/.wh.a",
        "opaque/.wh.deep",
        "opaque/fresh",
    ]
    lower_view = tmp_path / "lower-view"
    mount(f"ro,lowerdir={tmp_path / 'l2'}:{tmp_path / 'base'}", lower_view)
    base_layer = write_dir_layer(store, lower_view, CompressionOpts())
    applier = LayerApplier(store, scratch_dir=tmp_path / "scratch")
    for layer in (fast, double):
        target = tmp_path / f"target-{layer.diff_id[7:19]}"
        target.mkdir()
        bind = [Mount("bind", str(target), ("rbind", "rw"))]
        await applier.apply(base_layer.descriptor, bind)
        await applier.apply(layer.descriptor, bind)
        assert snapshot(target) == snapshot(tmp_path / "view")
