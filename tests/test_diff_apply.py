"""Applier semantics (whiteouts, opaque dirs, replacement) and hostile tars.

Every hostile case runs with a sentinel directory next to the root and checks
afterwards that the sentinel is byte-for-byte what it was.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ociworker.diff import apply_tar_stream
from ociworker.errors import UnsafePathError, UserError

Entry = tuple[tarfile.TarInfo, bytes]


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = mode
    ti.mtime = 1_700_000_000
    return ti, data


def dir_(name: str, mode: int = 0o755) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = mode
    ti.mtime = 1_600_000_000
    return ti, b""


def sym(name: str, target: str) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti, b""


def hard(name: str, target: str) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE
    ti.linkname = target
    return ti, b""


def build(*entries: Entry) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data else None)
    buf.seek(0)
    return buf


def fingerprint(root: Path) -> dict[str, tuple[int, int, str]]:
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_nlink, digest)
    return out


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(root, outside): the snapshot root and a sentinel dir that must not change."""
    root = tmp_path / "deep" / "er" / "root"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (outside / "sub").mkdir()
    (outside / "sub" / "keep").write_bytes(b"keep")
    before = fingerprint(tmp_path / "outside")
    before_parent = sorted(os.listdir(tmp_path))
    yield root, outside
    assert fingerprint(outside) == before
    assert sorted(os.listdir(tmp_path)) == before_parent
    assert sorted(os.listdir(tmp_path / "deep")) == ["er"]
    assert sorted(os.listdir(tmp_path / "deep" / "er")) == ["root"]


def test_dotdot_names_are_clamped(world: tuple[Path, Path]) -> None:
    root, _ = world
    apply_tar_stream(build(reg("../../x", b"1"), reg("a/../../../../y", b"2")), root)
    assert (root / "x").read_bytes() == b"1"
    assert (root / "y").read_bytes() == b"2"


def test_absolute_names_are_clamped(world: tuple[Path, Path]) -> None:
    root, _ = world
    apply_tar_stream(build(reg("/abs/x", b"1"), reg("//etc/passwd", b"2")), root)
    assert (root / "abs" / "x").read_bytes() == b"1"
    assert (root / "etc" / "passwd").read_bytes() == b"2"


def test_symlinked_parent_to_absolute_outside(world: tuple[Path, Path]) -> None:
    root, outside = world
    apply_tar_stream(build(sym("lnk", str(outside)), reg("lnk/pwned", b"x")), root)
    # the absolute target is taken as a path inside the root
    assert (root / str(outside).lstrip("/") / "pwned").read_bytes() == b"x"
    assert os.readlink(root / "lnk") == str(outside)


def test_symlinked_parent_climbing_out(world: tuple[Path, Path]) -> None:
    root, _ = world
    apply_tar_stream(
        build(sym("lnk", "../../../.."), reg("lnk/passwd", b"p"), sym("up", "/"), reg("up/etc/x")),
        root,
    )
    assert (root / "passwd").read_bytes() == b"p"
    assert (root / "etc" / "x").exists()


def test_symlinked_parent_to_relative_outside(world: tuple[Path, Path]) -> None:
    root, _ = world
    apply_tar_stream(build(sym("lnk", "../../../outside/sub"), reg("lnk/keep", b"over")), root)
    assert (root / "outside" / "sub" / "keep").read_bytes() == b"over"


def test_final_symlink_is_replaced_not_followed(world: tuple[Path, Path]) -> None:
    root, outside = world
    (root / "f").symlink_to(outside / "secret")
    (root / "d").symlink_to(outside / "sub")
    apply_tar_stream(build(reg("f", b"mine"), dir_("d"), reg("d/keep", b"mine")), root)
    assert not (root / "f").is_symlink() and (root / "f").read_bytes() == b"mine"
    assert not (root / "d").is_symlink() and (root / "d" / "keep").read_bytes() == b"mine"


@pytest.mark.parametrize("target", ["/etc/passwd", "../../x", "a/../../x", ".."])
def test_escaping_hardlinks_are_rejected(world: tuple[Path, Path], target: str) -> None:
    root, _ = world
    with pytest.raises(UnsafePathError):
        apply_tar_stream(build(reg("a/f"), hard("h", target)), root)
    assert not (root / "h").exists()


def test_hardlink_through_symlinked_parent_stays_inside(world: tuple[Path, Path]) -> None:
    root, outside = world
    with pytest.raises(UserError, match="does not exist"):
        apply_tar_stream(build(sym("lnk", str(outside)), hard("h", "lnk/secret")), root)
    assert not (root / "h").exists()


def test_hardlink_to_symlink_links_the_symlink(world: tuple[Path, Path]) -> None:
    root, outside = world
    apply_tar_stream(build(sym("s", str(outside / "secret")), hard("h", "s")), root)
    assert os.readlink(root / "h") == str(outside / "secret")
    assert os.lstat(root / "h").st_ino == os.lstat(root / "s").st_ino


@pytest.mark.parametrize("name", [".wh..", ".wh.", ".wh...", "a/.wh..", "x/../.wh..."])
def test_dot_whiteouts_are_rejected(world: tuple[Path, Path], name: str) -> None:
    root, _ = world
    (root / "a").mkdir()
    (root / "a" / "f").write_bytes(b"f")
    with pytest.raises(UnsafePathError):
        apply_tar_stream(build(reg(name)), root)
    assert (root / "a" / "f").read_bytes() == b"f"


def test_whiteout_and_opaque_through_symlinked_parent(world: tuple[Path, Path]) -> None:
    root, outside = world
    apply_tar_stream(
        build(
            sym("lnk", str(outside)),
            reg("lnk/.wh.secret"),
            reg("lnk/sub/.wh..wh..opq"),
            sym("rel", "../../../outside"),
            reg("rel/.wh.sub"),
        ),
        root,
    )


def test_entry_replacing_root_is_rejected(world: tuple[Path, Path]) -> None:
    root, _ = world
    with pytest.raises(UnsafePathError):
        apply_tar_stream(build(sym(".", "/")), root)
    with pytest.raises(UnsafePathError):
        apply_tar_stream(build(reg("../")), root)


def test_file_under_a_file_is_an_error(world: tuple[Path, Path]) -> None:
    root, _ = world
    with pytest.raises(UserError, match="not a directory"):
        apply_tar_stream(build(reg("f"), reg("f/g")), root)


def test_corrupt_tar_is_a_user_error(world: tuple[Path, Path]) -> None:
    root, _ = world
    data = build(reg("f", b"x" * 2000)).getvalue()
    with pytest.raises(UserError):
        apply_tar_stream(io.BytesIO(data[:700]), root)


# --- layer semantics -----------------------------------------------------------


def test_whiteout_removes_file_and_dir(tmp_path: Path) -> None:
    (tmp_path / "a" / "d").mkdir(parents=True)
    (tmp_path / "a" / "d" / "x").write_bytes(b"x")
    (tmp_path / "a" / "f").write_bytes(b"f")
    (tmp_path / "a" / "g").write_bytes(b"g")
    apply_tar_stream(build(reg("a/.wh.d"), reg("a/.wh.f"), reg("a/.wh.missing")), tmp_path)
    assert sorted(os.listdir(tmp_path / "a")) == ["g"]


def test_opaque_keeps_entries_of_the_same_layer(tmp_path: Path) -> None:
    (tmp_path / "d" / "old").mkdir(parents=True)
    (tmp_path / "d" / "old" / "x").write_bytes(b"x")
    (tmp_path / "d" / "oldf").write_bytes(b"o")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "lower").write_bytes(b"l")
    (tmp_path / "e").write_bytes(b"e")
    apply_tar_stream(
        build(
            dir_("d"),
            reg("d/sub/new", b"n"),  # before the marker, and its parent is implicit
            reg("d/.wh..wh..opq"),
            reg("d/z", b"z"),
        ),
        tmp_path,
    )
    assert sorted(os.listdir(tmp_path / "d")) == ["sub", "z"]
    # the marker empties only what came from below at the top of d; d/sub is
    # this layer's (it holds d/sub/new), so what it already held stays
    assert sorted(os.listdir(tmp_path / "d" / "sub")) == ["lower", "new"]
    assert (tmp_path / "e").exists()


def test_aufs_metadata_is_skipped(tmp_path: Path) -> None:
    apply_tar_stream(build(reg(".wh..wh.aufs"), reg("d/.wh..wh.plnk")), tmp_path)
    assert os.listdir(tmp_path) == []


def test_replacements(tmp_path: Path) -> None:
    (tmp_path / "dir-to-file").mkdir()
    (tmp_path / "dir-to-file" / "child").write_bytes(b"c")
    (tmp_path / "file-to-dir").write_bytes(b"f")
    (tmp_path / "dir-stays").mkdir()
    (tmp_path / "dir-stays" / "lower").write_bytes(b"l")
    (tmp_path / "file").write_bytes(b"old")
    apply_tar_stream(
        build(
            reg("dir-to-file", b"now a file"),
            dir_("file-to-dir", 0o700),
            dir_("dir-stays", 0o711),
            reg("file", b"new", 0o600),
        ),
        tmp_path,
    )
    assert (tmp_path / "dir-to-file").read_bytes() == b"now a file"
    assert (tmp_path / "file-to-dir").is_dir()
    assert stat.S_IMODE((tmp_path / "file-to-dir").stat().st_mode) == 0o700
    assert (tmp_path / "dir-stays" / "lower").exists()
    assert stat.S_IMODE((tmp_path / "dir-stays").stat().st_mode) == 0o711
    assert (tmp_path / "file").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == 0o600


def test_dir_times_and_modes_are_set_after_children(tmp_path: Path) -> None:
    apply_tar_stream(
        build(dir_("ro", 0o555), reg("ro/f", b"x"), dir_("ro/sub", 0o500), reg("ro/sub/g")),
        tmp_path,
    )
    assert stat.S_IMODE((tmp_path / "ro").stat().st_mode) == 0o555
    assert (tmp_path / "ro").stat().st_mtime == 1_600_000_000
    assert (tmp_path / "ro" / "sub").stat().st_mtime == 1_600_000_000
    assert (tmp_path / "ro" / "f").stat().st_mtime == 1_700_000_000


def test_pax_mtime_keeps_nanoseconds(tmp_path: Path) -> None:
    ti, data = reg("f")
    ti.pax_headers = {"mtime": "1700000000.123456789"}
    apply_tar_stream(build((ti, data)), tmp_path)
    assert (tmp_path / "f").stat().st_mtime_ns == 1_700_000_000_123_456_789


def test_overlay_xattrs_are_never_planted(tmp_path: Path) -> None:
    ti, data = reg("f")
    ti.pax_headers = {
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.user.overlay.redirect": "/x",
        "SCHILY.xattr.user.ok": "1",
    }
    apply_tar_stream(build((ti, data)), tmp_path)
    names = os.listxattr(tmp_path / "f")
    assert not any(".overlay." in n for n in names)
    assert os.getxattr(tmp_path / "f", "user.ok") == b"1"
