"""COPY / ADD through the CLI, as a user runs them: the busybox base image from the
local registry, real runc and overlayfs, the output tree exported with type=local."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from conftest import LEGS_MARK, current_cli, exported_ids
from test_build import write_context

pytestmark = LEGS_MARK

MTIME = 1_600_000_000


def build(tmp: Path, ctx: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    # as root, or as the test user in the rootless leg
    proc = current_cli().run(
        "build", "--root", str(tmp / "state"), "--progress", "plain",
        "--output", f"type=local,dest={tmp / 'out'}", str(ctx), check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def tar_of(entries: list[tuple[str, bytes, bytes, str]]) -> bytes:
    """(name, type, data, linkname) entries as an uncompressed tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, data, link in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mtime, ti.uid, ti.gid = kind, link, MTIME, 1234, 1234
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def ids(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def passwd_ids(out: Path, user: str) -> int:
    for line in (out / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == user:
            return int(f[2])
    raise AssertionError(f"no {user} in the image's /etc/passwd")


def group_id(out: Path, group: str) -> int:
    for line in (out / "etc/group").read_text().splitlines():
        f = line.split(":")
        if f[0] == group:
            return int(f[2])
    raise AssertionError(f"no {group} in the image's /etc/group")


def test_add_extracts_every_compression_and_copies_plain_files(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    blob = tar_of([("pkg", tarfile.DIRTYPE, b"", ""), ("pkg/hello", tarfile.REGTYPE, b"hi", "")])
    files = {
        "a.tar": blob,
        "a.tar.gz": gzip.compress(blob),
        "a.tar.bz2": bz2.compress(blob),
        "a.tar.xz": lzma.compress(blob),
        "a.tar.zst": zstandard.ZstdCompressor().compress(blob),
        "disguised.dat": gzip.compress(blob),  # detected by magic bytes, not by name
        "plain.txt": b"plain\n",
        "text.gz": gzip.compress(b"not a tar"),
    }
    lines = [f"FROM {base_image}"]
    lines += [f"ADD {n} /x/{n.replace('.', '_')}/" for n in files if n.startswith(("a.", "dis"))]
    lines += ["ADD plain.txt text.gz /plain/", "ADD --chown=1:2 a.tar.gz /owned"]
    ctx = write_context(tmp_path, "\n".join(lines) + "\n", files, mtime=MTIME)
    build(tmp_path, ctx)
    out = tmp_path / "out"
    for name in ("a_tar", "a_tar_gz", "a_tar_bz2", "a_tar_xz", "a_tar_zst", "disguised_dat"):
        assert (out / "x" / name / "pkg/hello").read_bytes() == b"hi", name
        # the archive's owners
        assert ids(out / "x" / name / "pkg/hello") == exported_ids(
            1234, 1234
        )  # the archive's owners
        assert os.stat(out / "x" / name / "pkg/hello").st_mtime == MTIME
    assert (out / "plain/plain.txt").read_bytes() == b"plain\n"
    assert gzip.decompress((out / "plain/text.gz").read_bytes()) == b"not a tar"
    assert ids(out / "plain/plain.txt") == exported_ids(0, 0)
    assert ids(out / "owned/pkg/hello") == exported_ids(1, 2)
    assert ids(out / "owned/pkg") == exported_ids(1, 2)


@pytest.mark.parametrize(
    "entries",
    [
        [("../../../../../../SENTINEL/dotdot", tarfile.REGTYPE, b"evil", "")],
        [("hl", tarfile.LNKTYPE, b"", "/etc/passwd")],
    ],
    ids=["dotdot", "absolute-hardlink"],
)
def test_hostile_archive_fails_and_writes_nothing_outside(
    tmp_path: Path,
    base_image: str,
    require_root: None,
    entries: list[tuple[str, bytes, bytes, str]],
) -> None:
    sentinel = tmp_path / "SENTINEL"
    sentinel.mkdir()
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nADD evil.tar /x/\n",
        {"evil.tar": tar_of(entries)},
        mtime=MTIME,
    )
    proc = build(tmp_path, ctx, check=False)
    assert proc.returncode != 0
    assert "outside the extraction root" in proc.stderr or "same archive" in proc.stderr
    assert list(sentinel.iterdir()) == []


def test_hostile_symlink_parent_is_contained(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    sentinel = tmp_path / "SENTINEL"
    sentinel.mkdir()
    up = os.path.relpath(sentinel, "/x")  # from /x inside the image, or on the host
    blob = tar_of(
        [
            ("up", tarfile.SYMTYPE, b"", "../../../../../../" + up),
            ("up/planted", tarfile.REGTYPE, b"evil", ""),
        ]
    )
    ctx = write_context(
        tmp_path, f"FROM {base_image}\nADD evil.tar /x/\n", {"evil.tar": blob}, mtime=MTIME
    )
    build(tmp_path, ctx)
    assert list(sentinel.iterdir()) == []
    # followed as the container would: clamped at the image's /
    assert (tmp_path / "out" / up.lstrip("./") / "planted").read_bytes() == b"evil"


def test_copy_wildcards_chown_chmod_and_heredoc(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    files = {"a.txt": b"a", "b.txt": b"b", ".hidden": b"h", "d/sub/f": b"f", "one.md": b"m"}
    dockerfile = f"""FROM {base_image}
COPY *.txt .hidden /multi/
COPY ?.txt /wild/
COPY *.md /single.md
COPY d /dircontents
COPY --chown=user a.txt /byname
COPY --chown=user:nogroup a.txt /bynames
COPY --chown=7:8 d /bynum/
COPY --chmod=0741 a.txt d /modes/
COPY <<EOF /doc/new/file.txt
heredoc body
EOF
"""
    build(tmp_path, write_context(tmp_path, dockerfile, files, mtime=MTIME))
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "multi")) == [".hidden", "a.txt", "b.txt"]
    assert sorted(os.listdir(out / "wild")) == ["a.txt", "b.txt"]
    assert (out / "single.md").read_bytes() == b"m"
    assert (out / "dircontents/sub/f").read_bytes() == b"f"
    assert os.stat(out / "dircontents/sub/f").st_mtime == MTIME
    user = passwd_ids(out, "user")
    assert ids(out / "byname") == exported_ids(user, user)  # no group: gid = uid
    assert ids(out / "bynames") == exported_ids(passwd_ids(out, "user"), group_id(out, "nogroup"))
    assert ids(out / "bynum/sub/f") == exported_ids(7, 8)
    assert ids(out / "bynum/sub") == exported_ids(7, 8)
    assert ids(out / "multi/a.txt") == exported_ids(0, 0)
    assert stat.S_IMODE(os.stat(out / "modes/a.txt").st_mode) == 0o741
    assert stat.S_IMODE(os.stat(out / "modes/sub/f").st_mode) == 0o741
    assert (out / "doc/new/file.txt").read_text() == "heredoc body\n"


def test_copy_several_sources_to_a_file_fails(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(
        tmp_path,
        f"FROM {base_image}\nCOPY *.txt /file\n",
        {"a.txt": b"", "b.txt": b""},
        mtime=MTIME,
    )
    proc = build(tmp_path, ctx, check=False)
    assert proc.returncode != 0
    assert "destination must be a directory and end with a /" in proc.stderr


def test_copy_missing_and_dockerignored_sources_are_named(
    tmp_path: Path, base_image: str, require_root: None
) -> None:
    ctx = write_context(
        tmp_path, f"FROM {base_image}\nCOPY secret.txt /\n", {"secret.txt": b"s"}, mtime=MTIME
    )
    (ctx / ".dockerignore").write_text("secret.txt\n")
    proc = build(tmp_path, ctx, check=False)
    assert proc.returncode != 0
    assert '"/secret.txt"' in proc.stderr and ".dockerignore" in proc.stderr


def test_copy_parents(tmp_path: Path, base_image: str, require_root: None) -> None:
    files = {"a/b/x.txt": b"x", "a/b/y.md": b"y", "p/q/r/s.txt": b"s", "p/q/other": b"o"}
    dockerfile = (
        f"FROM {base_image}\nCOPY --parents a/b/*.txt /dst/\nCOPY --parents ./p/./q/r /piv/\n"
    )
    build(tmp_path, write_context(tmp_path, dockerfile, files, mtime=MTIME))
    out = tmp_path / "out"
    assert (out / "dst/a/b/x.txt").read_bytes() == b"x"
    assert not (out / "dst/a/b/y.md").exists()
    assert (out / "piv/q/r/s.txt").read_bytes() == b"s"
    assert not (out / "piv/q/other").exists()
    assert not (out / "piv/p").exists()


def test_copy_exclude(tmp_path: Path, base_image: str, require_root: None) -> None:
    files = {"src/a.py": b"a", "src/a.md": b"m", "src/deep/b.md": b"m", "src/deep/c.py": b"c"}
    dockerfile = (
        f"FROM {base_image}\nCOPY --exclude=*.md src /top/\nCOPY --exclude=**/*.md src /all/\n"
    )
    build(tmp_path, write_context(tmp_path, dockerfile, files, mtime=MTIME))
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "top")) == ["a.py", "deep"]
    assert sorted(os.listdir(out / "top/deep")) == ["b.md", "c.py"]
    assert sorted(os.listdir(out / "all/deep")) == ["c.py"]
