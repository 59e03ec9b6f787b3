"""COPY / ADD semantics of the file-op engine on plain tmp dirs (no mounts, no root).

Ownership assertions need root; without it they are skipped, the rest still runs.
Hostile-archive cases keep a sentinel directory next to the destination root and
check afterwards that nothing appeared or changed there.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from ociworker.core.graph import Copy, Mkfile
from ociworker.errors import NotFoundError, UnsafePathError, UserError
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.fs.walk import Source, match_sources
from ociworker.ops import fileactions as fileops
from ociworker.ops.fileactions import do_copy, do_mkfile
from ociworker.ops.untar import Compression, detect_compression, is_tar_archive

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chown needs root")
MTIME = 1_600_000_000


@dataclass(frozen=True)
class Env:
    ctx: Path  # the build context (copy source)
    dest: Path  # the destination snapshot root
    sentinel: Path  # next to dest: nothing may ever be written here

    def source(self, ignore: list[str] | None = None) -> Source:
        matcher = IgnoreMatcher(ignore) if ignore else None
        return Source(self.ctx, matcher, is_context=True)

    def write(self, rel: str, data: str = "x", mode: int = 0o644) -> Path:
        p = self.ctx / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(data)
        p.chmod(mode)
        os.utime(p, (MTIME, MTIME))
        return p


@pytest.fixture
def env(tmp_path: Path) -> Env:
    ctx, dest, sentinel = tmp_path / "ctx", tmp_path / "root", tmp_path / "sentinel"
    for d in (ctx, dest, sentinel):
        d.mkdir()
    (dest / "etc").mkdir()
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1001:1002::/home/alice:/bin/sh\n"
    )
    (dest / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\nalice:x:1002:\n")
    (sentinel / "keep").write_text("sentinel")
    return Env(ctx, dest, sentinel)


def copy(src: str, dest: str, **kw: object) -> Copy:
    return Copy(src_input=1, src=src, dest=dest, **kw)  # type: ignore[arg-type]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} - {"etc", "etc/passwd", "etc/group"}


def assert_sentinel_intact(env: Env) -> None:
    assert sorted(p.name for p in env.sentinel.iterdir()) == ["keep"]
    assert (env.sentinel / "keep").read_text() == "sentinel"


# --- archives -------------------------------------------------------------------------


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def reg(
    name: str, data: bytes = b"data", mode: int = 0o640, uid: int = 0
) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uid, ti.gid = len(data), mode, MTIME, uid, uid
    return ti, data


def special(
    name: str, kind: bytes, link: str = "", mode: int = 0o755
) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = kind, link, mode, MTIME
    return ti, b""


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _plain(data: bytes) -> bytes:
    return data


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "plain": _plain,
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "zstd": _zstd,
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_add_extracts_tar_archives_detected_by_magic_bytes(env: Env, kind: str) -> None:
    blob = make_tar(
        [
            special("app", tarfile.DIRTYPE, mode=0o750),
            reg("app/bin.sh", b"#!/bin/sh\n", 0o755),
            reg("app/data.txt", b"hello"),
        ]
    )
    # A name that says nothing: detection must not rely on ".tar.gz".
    (env.ctx / "blob.bin").write_bytes(COMPRESSORS[kind](blob))
    do_copy(env.dest, env.source(), copy("blob.bin", "/opt", unpack_archive=True), "/")
    assert tree(env.dest) == {"opt", "opt/app", "opt/app/bin.sh", "opt/app/data.txt"}
    assert (env.dest / "opt/app/data.txt").read_bytes() == b"hello"
    assert stat.S_IMODE(os.stat(env.dest / "opt/app/bin.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(env.dest / "opt/app").st_mode) == 0o750
    assert os.stat(env.dest / "opt/app/data.txt").st_mtime == MTIME
    assert os.stat(env.dest / "opt/app").st_mtime == MTIME


def test_detect_compression_by_magic() -> None:
    assert detect_compression(gzip.compress(b"x")) is Compression.GZIP
    assert detect_compression(bz2.compress(b"x")) is Compression.BZIP2
    assert detect_compression(lzma.compress(b"x")) is Compression.XZ
    assert detect_compression(zstandard.ZstdCompressor().compress(b"x")) is Compression.ZSTD
    assert detect_compression(b"\x50\x2a\x4d\x18rest") is Compression.ZSTD  # skippable frame
    assert detect_compression(b"plain text") is Compression.NONE


def test_compressed_non_tar_and_fake_tar_name_are_copied_as_files(env: Env) -> None:
    (env.ctx / "notes.gz").write_bytes(gzip.compress(b"just text, not a tar"))
    (env.ctx / "fake.tar").write_text("not an archive")
    (env.ctx / "empty.tar").write_bytes(b"")
    for name in ("notes.gz", "fake.tar", "empty.tar"):
        assert not is_tar_archive(env.ctx / name)
        do_copy(env.dest, env.source(), copy(name, "/in/", unpack_archive=True), "/")
    assert tree(env.dest) == {"in", "in/notes.gz", "in/fake.tar", "in/empty.tar"}
    assert gzip.decompress((env.dest / "in/notes.gz").read_bytes()) == b"just text, not a tar"


def test_copy_never_extracts_and_add_of_a_dir_copies_it(env: Env) -> None:
    (env.ctx / "a.tar").write_bytes(make_tar([reg("inside")]))
    env.write("d/a.tar.gz", "x")
    do_copy(env.dest, env.source(), copy("a.tar", "/c/"), "/")
    do_copy(env.dest, env.source(), copy("d", "/d/", unpack_archive=True), "/")
    assert tree(env.dest) == {"c", "c/a.tar", "d", "d/a.tar.gz"}


def test_archive_chown_applies_and_chmod_does_not(env: Env) -> None:
    (env.ctx / "a.tar").write_bytes(make_tar([reg("f", mode=0o600, uid=7), reg("d/g", uid=7)]))
    action = copy("a.tar", "/x/", unpack_archive=True, chown="alice", chmod=0o777)
    do_copy(env.dest, env.source(), action, "/")
    assert stat.S_IMODE(os.stat(env.dest / "x/f").st_mode) == 0o600
    if ROOT:
        for p in ("x/f", "x/d", "x/d/g"):
            st = os.lstat(env.dest / p)
            # alice's primary group from /etc/passwd, as BuildKit (dockerd 20.10 agrees)
            assert (st.st_uid, st.st_gid) == (1001, 1002), p


@needs_root
def test_archive_without_chown_keeps_the_archive_owners(env: Env) -> None:
    (env.ctx / "a.tar").write_bytes(make_tar([reg("f", uid=33)]))
    do_copy(env.dest, env.source(), copy("a.tar", "/x", unpack_archive=True), "/")
    st = os.lstat(env.dest / "x/f")
    assert (st.st_uid, st.st_gid) == (33, 33)


def test_archive_whiteout_names_are_plain_files(env: Env) -> None:
    (env.dest / "x").mkdir()
    (env.dest / "x/victim").write_text("still here")
    (env.ctx / "a.tar").write_bytes(make_tar([reg(".wh.victim"), reg(".wh..wh..opq")]))
    do_copy(env.dest, env.source(), copy("a.tar", "/x/", unpack_archive=True), "/")
    assert (env.dest / "x/victim").read_text() == "still here"
    assert (env.dest / "x/.wh.victim").is_file()
    assert (env.dest / "x/.wh..wh..opq").is_file()


def test_archive_hardlink_to_an_earlier_entry_works(env: Env) -> None:
    blob = make_tar([reg("a", b"same"), special("b", tarfile.LNKTYPE, link="a")])
    (env.ctx / "a.tar").write_bytes(blob)
    do_copy(env.dest, env.source(), copy("a.tar", "/x/", unpack_archive=True), "/")
    assert os.stat(env.dest / "x/a").st_ino == os.stat(env.dest / "x/b").st_ino


@pytest.mark.parametrize(
    "entries",
    [
        [reg("../escape")],
        [reg("ok/../../escape")],
        [special("h", tarfile.LNKTYPE, link="/etc/passwd")],
        [special("h", tarfile.LNKTYPE, link="../../sentinel/keep")],
    ],
    ids=["dotdot", "dotdot-inside", "abs-hardlink", "hardlink-out"],
)
def test_hostile_archive_is_refused(env: Env, entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    (env.ctx / "evil.tar").write_bytes(make_tar(entries))
    passwd = (env.dest / "etc/passwd").read_text()
    with pytest.raises(UnsafePathError):
        do_copy(env.dest, env.source(), copy("evil.tar", "/x/", unpack_archive=True), "/")
    assert_sentinel_intact(env)
    assert os.stat(env.dest / "etc/passwd").st_nlink == 1
    assert (env.dest / "etc/passwd").read_text() == passwd


def test_archive_symlink_parent_stays_inside_the_snapshot(env: Env) -> None:
    sentinel_rel = os.path.relpath(env.sentinel, env.dest / "x")
    blob = make_tar(
        [
            special("up", tarfile.SYMTYPE, link=sentinel_rel),  # relative, leaves the root
            reg("up/planted", b"evil"),
            special("abs", tarfile.SYMTYPE, link="/"),
            reg("abs/at-root", b"contained"),
        ]
    )
    (env.ctx / "evil.tar").write_bytes(blob)
    do_copy(env.dest, env.source(), copy("evil.tar", "/x/", unpack_archive=True), "/")
    assert_sentinel_intact(env)
    # Followed as the container would: clamped at the snapshot root.
    assert (env.dest / "at-root").read_bytes() == b"contained"
    assert (env.dest / "sentinel/planted").read_bytes() == b"evil"
    assert os.readlink(env.dest / "x/up") == sentinel_rel


# --- --exclude ------------------------------------------------------------------------


def test_exclude_is_relative_to_each_source(env: Env) -> None:
    for rel in ("dir1/a.1", "dir1/a.2", "dir1/dir2/a.1", "dir1/keep.1"):
        env.write(rel)
    action = copy("dir1", "/out/", exclude=("*.1", "!keep.1"))
    do_copy(env.dest, env.source(), action, "/")
    assert tree(env.dest) == {"out", "out/a.2", "out/dir2", "out/dir2/a.1", "out/keep.1"}


def test_exclude_double_star_and_directories(env: Env) -> None:
    for rel in ("src/a.md", "src/x/b.md", "src/x/c.py", "src/node_modules/m/i.js"):
        env.write(rel)
    action = copy("src", "/out/", exclude=("**/*.md", "node_modules"))
    do_copy(env.dest, env.source(), action, "/")
    assert tree(env.dest) == {"out", "out/x", "out/x/c.py"}


def test_exclude_applies_to_wildcard_matches_by_name(env: Env) -> None:
    for rel in ("homefile.txt", "homework.py", "home.md"):
        env.write(rel)
    do_copy(env.dest, env.source(), copy("hom*", "/mydir/", exclude=("*.txt",)), "/")
    assert tree(env.dest) == {"mydir", "mydir/homework.py", "mydir/home.md"}


# --- --parents ------------------------------------------------------------------------


def test_parents_keeps_the_source_directories(env: Env) -> None:
    for rel in ("a/b/x.txt", "a/b/y.txt", "a/b/z.md", "a/c/x.txt"):
        env.write(rel)
    os.chmod(env.ctx / "a", 0o711)
    do_copy(env.dest, env.source(), copy("a/b/*.txt", "/dst/", parents=True), "/")
    assert tree(env.dest) == {"dst", "dst/a", "dst/a/b", "dst/a/b/x.txt", "dst/a/b/y.txt"}
    # the directories in between are copied with their own metadata
    assert stat.S_IMODE(os.stat(env.dest / "dst/a").st_mode) == 0o711


def test_parents_pivot_keeps_only_what_follows_it(env: Env) -> None:
    env.write("x/y/z", "zz")
    env.write("x/y/other")
    do_copy(env.dest, env.source(), copy("./x/./y/z", "/p/", parents=True), "/")
    assert tree(env.dest) == {"p", "p/y", "p/y/z"}
    assert (env.dest / "p/y/z").read_text() == "zz"


def test_parents_of_a_directory_and_double_star(env: Env) -> None:
    for rel in ("w/one/f.go", "w/one/deep/g.go", "w/two/h.txt"):
        env.write(rel)
    do_copy(env.dest, env.source(), copy("w/one", "/a/", parents=True), "/")
    do_copy(env.dest, env.source(), copy("w/**/*.txt", "/b/", parents=True), "/")
    assert tree(env.dest) == {
        "a", "a/w", "a/w/one", "a/w/one/f.go", "a/w/one/deep", "a/w/one/deep/g.go",
        "b", "b/w", "b/w/two", "b/w/two/h.txt",
    }  # fmt: skip


def test_parents_missing_literal_or_unmatched_wildcard_is_not_found(env: Env) -> None:
    env.write("a/b/x.txt")
    with pytest.raises(NotFoundError, match=r'"/a/b/nope"'):
        do_copy(env.dest, env.source(), copy("a/b/nope", "/d/", parents=True), "/")
    with pytest.raises(NotFoundError, match=r"\*\.png"):
        do_copy(env.dest, env.source(), copy("a/*.png", "/d/", parents=True), "/")


# --- wildcards, destinations, errors --------------------------------------------------


def test_wildcards_follow_go_filepath_match(env: Env) -> None:
    for rel in (".hidden", "a1", "b2", "c3", "lit*eral"):
        env.write(rel)
    src = env.source()
    assert match_sources(src, "*", True) == [".hidden", "a1", "b2", "c3", "lit*eral"]
    assert match_sources(src, "?[12]", True) == ["a1", "b2"]
    assert match_sources(src, "[^ab]?", True) == ["c3"]
    assert match_sources(src, "[a-b]*", True) == ["a1", "b2"]
    assert match_sources(src, "lit\\*e*", True) == ["lit*eral"]
    assert match_sources(src, "[!b]1", True) == []  # "!" is no negation in Go


def test_several_matches_need_a_directory_destination(env: Env) -> None:
    env.write("a.txt", "a")
    env.write("b.txt", "b")
    with pytest.raises(UserError) as info:
        do_copy(env.dest, env.source(), copy("*.txt", "/file"), "/")
    assert str(info.value) == (
        "When using COPY with more than one source file, "
        "the destination must be a directory and end with a /"
    )
    do_copy(env.dest, env.source(), copy("*.txt", "/dir/"), "/")
    (env.dest / "existing").mkdir()
    do_copy(env.dest, env.source(), copy("*.txt", "/existing"), "/")
    assert tree(env.dest) == {
        "dir", "dir/a.txt", "dir/b.txt", "existing", "existing/a.txt", "existing/b.txt",
    }  # fmt: skip


def test_single_wildcard_match_to_a_file_name(env: Env) -> None:
    env.write("target/app-1.0.jar", "jar")
    do_copy(env.dest, env.source(), copy("target/*.jar", "/app.jar"), "/")
    assert (env.dest / "app.jar").read_text() == "jar"


def test_not_found_names_the_path_and_dockerignore(env: Env) -> None:
    env.write("secret.txt")
    with pytest.raises(NotFoundError, match=r'"/missing.txt": not found in build context$'):
        do_copy(env.dest, env.source(), copy("missing.txt", "/"), "/")
    with pytest.raises(NotFoundError, match=r'"/secret.txt".*excluded by .dockerignore'):
        do_copy(env.dest, env.source(["secret.txt"]), copy("secret.txt", "/"), "/")
    with pytest.raises(NotFoundError, match=r'"/\*.png"'):
        do_copy(env.dest, env.source(), copy("*.png", "/d/"), "/")


def test_directory_copies_its_contents_and_file_goes_into_existing_dir(env: Env) -> None:
    env.write("d/sub/f", "f")
    env.write("g", "g")
    (env.dest / "opt").mkdir()
    do_copy(env.dest, env.source(), copy("d", "/out"), "/")
    do_copy(env.dest, env.source(), copy("g", "/opt"), "/")
    assert tree(env.dest) == {"out", "out/sub", "out/sub/f", "opt", "opt/g"}


def test_copy_of_the_context_root_leaves_the_destination_root_alone(env: Env) -> None:
    env.write("f")
    os.chmod(env.ctx, 0o700)
    os.chmod(env.dest, 0o755)
    do_copy(env.dest, env.source(), copy(".", "/"), "/")
    do_copy(env.dest, env.source(), copy(".", "/new"), "/")
    assert stat.S_IMODE(os.stat(env.dest).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(env.dest / "new").st_mode) == 0o755
    assert (env.dest / "f").exists()


def test_chmod_applies_to_files_and_dirs_and_mtimes_are_kept(env: Env) -> None:
    env.write("d/f", mode=0o600)
    os.utime(env.ctx / "d", (MTIME, MTIME))
    do_copy(env.dest, env.source(), copy("d", "/out/d", chmod=0o751), "/")
    assert stat.S_IMODE(os.stat(env.dest / "out/d/f").st_mode) == 0o751
    assert stat.S_IMODE(os.stat(env.dest / "out/d").st_mode) == 0o751
    assert os.stat(env.dest / "out/d/f").st_mtime == MTIME
    assert os.stat(env.dest / "out/d").st_mtime == MTIME


@needs_root
@pytest.mark.parametrize(
    ("spec", "ids"),
    [("alice", (1001, 1002)), ("alice:staff", (1001, 50)), ("7", (7, 7)), ("7:8", (7, 8))],
)
def test_chown_by_name_and_number(env: Env, spec: str, ids: tuple[int, int]) -> None:
    env.write("d/f")
    do_copy(env.dest, env.source(), copy("d", "/new/dir/", chown=spec), "/")
    for p in ("new", "new/dir", "new/dir/f"):
        st = os.lstat(env.dest / p)
        assert (st.st_uid, st.st_gid) == ids, p


def test_chown_of_an_unknown_name_fails(env: Env) -> None:
    env.write("f")
    with pytest.raises(UserError, match="unable to find user bob"):
        do_copy(env.dest, env.source(), copy("f", "/f", chown="bob"), "/")


@needs_root
def test_context_files_are_root_owned_and_stage_files_keep_owners(env: Env) -> None:
    f = env.write("f")
    os.chown(f, 123, 456)
    do_copy(env.dest, env.source(), copy("f", "/ctx"), "/")
    do_copy(env.dest, Source(env.ctx), copy("f", "/stage"), "/")
    assert (os.lstat(env.dest / "ctx").st_uid, os.lstat(env.dest / "ctx").st_gid) == (0, 0)
    assert (os.lstat(env.dest / "stage").st_uid, os.lstat(env.dest / "stage").st_gid) == (123, 456)


# --- heredoc (Mkfile) -----------------------------------------------------------------


def test_mkfile_creates_parents_with_mode_and_owner(env: Env) -> None:
    do_mkfile(env.dest, Mkfile("/a/b/script.sh", "echo hi\n", 0o4755, "alice:staff"), "/")
    p = env.dest / "a/b/script.sh"
    assert p.read_text() == "echo hi\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755
    if ROOT:
        assert (os.stat(p).st_uid, os.stat(p).st_gid) == (1001, 50)
        assert (os.stat(env.dest / "a").st_uid, os.stat(env.dest / "a").st_gid) == (1001, 50)


def test_mkfile_relative_to_workdir_and_refuses_a_directory(env: Env) -> None:
    do_mkfile(env.dest, Mkfile("conf", "x"), "/srv")
    assert (env.dest / "srv/conf").read_text() == "x"
    (env.dest / "dir").mkdir()
    (env.dest / "dir/kept").write_text("k")
    with pytest.raises(UserError, match="directory is in the way"):
        do_mkfile(env.dest, Mkfile("/dir", "x"), "/")
    assert (env.dest / "dir/kept").read_text() == "k"


def test_source_roots_cover_everything_a_parents_copy_can_reach(env: Env) -> None:
    for rel in ("w/one/deep/g.go", "w/two/h.txt", "x/y/z"):
        env.write(rel)
    src = env.source()
    assert fileops.source_roots(src, copy("w/**/*.txt", "/b/", parents=True)) == ["w"]
    assert fileops.source_roots(src, copy("./x/./y/z", "/p/", parents=True)) == ["x/y/z"]
    assert fileops.source_roots(src, copy("*/one", "/p/", parents=True)) == [""]
    assert fileops.source_roots(src, copy("w/*", "/p/")) == ["w/one", "w/two"]
