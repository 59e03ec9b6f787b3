"""The overlay fast path writes what the double walk writes (no root, no mounts).

Layer dirs, an upperdir and the merged trees the kernel would show are built
by hand. The fast path needs no mount for a read-only overlay view of the shape
``lowerdir=UPPER:LOWER...`` over ``lowerdir=LOWER...``; the double walk gets the
merged trees as binds. Cases that need a whiteout device or trusted xattrs (a
deleted file, an opaque dir, a whiteout in a nearer lower layer) are in
integration/test_diff_overlay.py, on the kernel's own overlay.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ociworker.content.store import ContentStore
from ociworker.core.mounts import Mount
from ociworker.diff import CompressionOpts, LayerComparer

NS = 1_000_000_000
T = 1_600_000_000 * NS + 250_000_000


def bind(path: Path) -> list[Mount]:
    return [Mount("bind", str(path), ("rbind", "rw"))]


def ro_view(*layers: Path, userxattr: bool = False) -> list[Mount]:
    opts = (f"lowerdir={':'.join(map(str, layers))}",) + (("userxattr",) if userxattr else ())
    return [Mount("overlay", "overlay", opts)]


def entries(store: ContentStore, lower: list[Mount], upper: list[Mount]) -> list[tuple[Any, ...]]:
    layer = LayerComparer(store).compare_sync(lower, upper, CompressionOpts("uncompressed"))
    raw = store.read(layer.descriptor.digest)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return [
            (m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname, m.pax_headers)
            for m in tf.getmembers()
        ]


def fix_times(*roots: Path) -> None:
    """One mtime for everything, children first (so parents keep it)."""
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames + dirnames:
                os.utime(Path(dirpath, name), ns=(T, T), follow_symlinks=False)


def make_lower(root: Path) -> None:
    for d in ("etc", "usr/lib", "var/log", "srv"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (root / "usr" / "lib" / "libc.so").write_bytes(b"elf")
    (root / "file-then-dir").write_bytes(b"a file below")
    os.chmod(root / "srv", 0o700)


def copy_up(lower: Path, upper: Path, rel: str) -> None:
    """What the kernel does to a dir when something below it is touched: the
    same dir in the upperdir, with the lower one's mode and owner."""
    src, dst = lower / rel, upper / rel
    dst.mkdir(parents=True, exist_ok=True)
    st = os.lstat(src)
    os.chmod(dst, st.st_mode & 0o7777)
    os.chown(dst, st.st_uid, st.st_gid)


def _unchanged(lo: Path, up: Path, merged: Path) -> None:
    copy_up(lo, up, "etc")  # e.g. a mount point made and gone
    copy_up(lo, up, "var/log")  # nested, nothing below either


def _new_file_below(lo: Path, up: Path, merged: Path) -> None:
    copy_up(lo, up, "usr/lib")
    for root in (up, merged):
        (root / "usr" / "lib" / "new.so").write_bytes(b"new")
        (root / "usr" / "lib" / "second.so").write_bytes(b"two")


def _mode_changed(lo: Path, up: Path, merged: Path) -> None:
    copy_up(lo, up, "srv")
    for root in (up, merged):
        os.chmod(root / "srv", 0o755)


def _new_empty_dir(lo: Path, up: Path, merged: Path) -> None:
    for root in (up, merged):
        (root / "new" / "empty").mkdir(parents=True)


def _dir_over_file(lo: Path, up: Path, merged: Path) -> None:
    (merged / "file-then-dir").unlink()
    for root in (up, merged):
        (root / "file-then-dir").mkdir()


Case = Callable[[Path, Path, Path], None]
CASES: dict[str, tuple[Case, list[str]]] = {
    "copied-up-unchanged": (_unchanged, []),
    "new-file-below": (_new_file_below, ["usr", "usr/lib", "usr/lib/new.so", "usr/lib/second.so"]),
    "mode-changed": (_mode_changed, ["srv"]),
    "new-empty-dir": (_new_empty_dir, ["new", "new/empty"]),
    "dir-over-file": (_dir_over_file, ["file-then-dir"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_writes_what_the_double_walk_writes(tmp_path: Path, case: str) -> None:
    change, names = CASES[case]
    lo, up, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    make_lower(lo)
    up.mkdir()
    subprocess.run(["cp", "-a", "--", str(lo), str(merged)], check=True)
    change(lo, up, merged)
    fix_times(lo, up, merged)
    store = ContentStore(tmp_path / "content")

    fast = entries(store, ro_view(lo), ro_view(up, lo))
    double = entries(store, bind(lo), bind(merged))
    assert [e[0] for e in fast] == names
    assert fast == double


def test_all_cases_at_once(tmp_path: Path) -> None:
    lo, up, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    make_lower(lo)
    up.mkdir()
    subprocess.run(["cp", "-a", "--", str(lo), str(merged)], check=True)
    for change, _ in CASES.values():
        change(lo, up, merged)
    fix_times(lo, up, merged)
    store = ContentStore(tmp_path / "content")
    fast = entries(store, ro_view(lo), ro_view(up, lo))
    assert fast == entries(store, bind(lo), bind(merged))
    assert sorted(e[0] for e in fast) == sorted(n for _, names in CASES.values() for n in names)


def user_xattrs(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError:
        return False
    os.removexattr(path, "user.probe")
    return True


def test_opaque_dir_in_a_nearer_lower_layer_hides_the_farther_ones(tmp_path: Path) -> None:
    # l1 has d/sub; l2 re-made d as an opaque dir (userxattr: user.overlay.opaque), so the
    # lower view has an empty d. A d/sub in the upperdir, with d/sub's exact metadata,
    # is new: looking only at l1 would call d and d/sub unchanged and write nothing.
    l1, l2, up = tmp_path / "l1", tmp_path / "l2", tmp_path / "upper"
    lower_view, merged = tmp_path / "lower-view", tmp_path / "merged"
    for root in (l1, l2, up, lower_view, merged):
        root.mkdir()
    if not user_xattrs(l2):
        pytest.skip("no user xattrs on this filesystem")
    (l1 / "d" / "sub").mkdir(parents=True)
    (l1 / "d" / "sub" / "old").write_bytes(b"old")
    (l2 / "d").mkdir()
    os.setxattr(l2 / "d", "user.overlay.opaque", b"y")
    (lower_view / "d").mkdir()
    copy_up(l2, up, "d")
    (up / "d" / "sub").mkdir()
    (merged / "d" / "sub").mkdir(parents=True)
    fix_times(l1, l2, up, lower_view, merged)
    store = ContentStore(tmp_path / "content")

    fast = entries(store, ro_view(l2, l1, userxattr=True), ro_view(up, l2, l1, userxattr=True))
    assert [e[0] for e in fast] == ["d", "d/sub"]
    assert fast == entries(store, bind(lower_view), bind(merged))
