from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from ociworker.exporter.fs import export_local, export_tar

ROOT = os.geteuid() == 0
MTIME_NS = 1_600_000_000_123_456_789


def _xattr_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError:
        return False
    os.removexattr(path, "user.probe")
    return True


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(b"#!tool\n")
    (src / "bin" / "tool").chmod(0o4751)
    os.link(src / "bin" / "tool", src / "bin" / "tool-link")
    (src / "bin" / "sh").symlink_to("tool")
    (src / "etc-link").symlink_to("/etc")  # must stay a link, never be followed
    (src / "ro").mkdir()
    (src / "ro" / "file").write_bytes(b"x" * 3_000_000)
    os.utime(src / "ro" / "file", ns=(MTIME_NS, MTIME_NS))
    (src / "ro").chmod(0o555)
    os.mkfifo(src / "fifo", 0o640)
    if ROOT:
        os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chmod(src / "null", 0o666)  # mknod applied the umask
        os.chown(src / "bin" / "tool", 1234, 5678)
        (src / "bin" / "tool").chmod(0o4751)  # chown cleared the set-uid bit
        os.lchown(src / "bin" / "sh", 42, 43)
    if _xattr_supported(src / "bin" / "tool"):
        os.setxattr(src / "bin" / "tool", "user.note", b"\xff\x00bin")
    os.utime(src / "bin" / "sh", ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(src / "bin", ns=(MTIME_NS, MTIME_NS))
    return src


def test_export_local(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "dest"
    export_local(tree, dest)

    tool = dest / "bin" / "tool"
    assert tool.read_bytes() == b"#!tool\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4751
    assert tool.stat().st_ino == (dest / "bin" / "tool-link").stat().st_ino
    assert os.readlink(dest / "bin" / "sh") == "tool"
    assert os.readlink(dest / "etc-link") == "/etc"
    assert (dest / "bin" / "sh").lstat().st_mtime_ns == MTIME_NS
    assert (dest / "bin").stat().st_mtime_ns == MTIME_NS
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert (dest / "ro" / "file").stat().st_size == 3_000_000
    assert (dest / "ro" / "file").stat().st_mtime_ns == MTIME_NS
    assert stat.S_ISFIFO((dest / "fifo").lstat().st_mode)
    assert stat.S_IMODE((dest / "fifo").lstat().st_mode) == 0o640
    if ROOT:
        assert (tool.stat().st_uid, tool.stat().st_gid) == (1234, 5678)
        assert ((dest / "bin" / "sh").lstat().st_uid, (dest / "bin" / "sh").lstat().st_gid) == (
            42,
            43,
        )
        null = (dest / "null").lstat()
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(null.st_mode) == 0o666
    if "user.note" in os.listxattr(tree / "bin" / "tool"):
        assert os.getxattr(tool, "user.note") == b"\xff\x00bin"


def test_export_local_never_writes_through_symlinks(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tool").write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    # dest already holds symlinks where the tree has a directory and a file
    (dest / "bin").symlink_to(outside)
    (dest / "fifo").symlink_to(outside / "tool")
    (dest / "ro").symlink_to("../outside")
    (dest / "keep").write_bytes(b"k")

    export_local(tree, dest)

    assert sorted(p.name for p in outside.iterdir()) == ["tool"]
    assert (outside / "tool").read_bytes() == b"precious"
    assert (dest / "bin").is_dir() and not (dest / "bin").is_symlink()
    assert (dest / "bin" / "tool").read_bytes() == b"#!tool\n"
    assert stat.S_ISFIFO((dest / "fifo").lstat().st_mode)
    assert not (dest / "ro").is_symlink()
    assert (dest / "keep").read_bytes() == b"k"


def test_export_local_replaces_a_directory_with_a_file(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "fifo" / "sub").mkdir(parents=True)
    export_local(tree, dest)
    assert stat.S_ISFIFO((dest / "fifo").lstat().st_mode)


def test_export_tar(tree: Path) -> None:
    out = io.BytesIO()
    export_tar(tree, out)
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:") as tar:
        members = {m.name: m for m in tar}
        names = list(members)
        assert names == [
            "bin",
            "bin/sh",
            "bin/tool",
            "bin/tool-link",
            "etc-link",
            "fifo",
            *(["null"] if ROOT else []),
            "ro",
            "ro/file",
        ]
        tool = members["bin/tool"]
        f = tar.extractfile(tool)
        assert f is not None and f.read() == b"#!tool\n"
        assert tool.mode == 0o4751
        assert members["bin/tool-link"].islnk()
        assert members["bin/tool-link"].linkname == "bin/tool"
        assert members["bin/sh"].issym() and members["bin/sh"].linkname == "tool"
        assert members["etc-link"].issym() and members["etc-link"].linkname == "/etc"
        assert members["fifo"].isfifo()
        assert members["ro"].isdir() and members["ro"].mode == 0o555
        assert members["ro/file"].size == 3_000_000
        assert int(members["ro/file"].mtime) == MTIME_NS // 10**9
        assert all(m.uname == "" and m.gname == "" for m in members.values())
        if ROOT:
            assert (tool.uid, tool.gid) == (1234, 5678)
            assert members["null"].ischr()
            assert (members["null"].devmajor, members["null"].devminor) == (1, 3)
        if "user.note" in os.listxattr(tree / "bin" / "tool"):
            raw = tool.pax_headers["SCHILY.xattr.user.note"]
            assert raw.encode("utf-8", "surrogateescape") == b"\xff\x00bin"


def test_export_tar_is_reproducible(tree: Path) -> None:
    a, b = io.BytesIO(), io.BytesIO()
    export_tar(tree, a)
    export_tar(tree, b)
    assert a.getvalue() == b.getvalue()
