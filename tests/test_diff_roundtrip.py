"""Comparer and applier round trips on plain directories (bind mounts, no root)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zstandard

from ociworker.content.store import ContentStore
from ociworker.core.mounts import Mount
from ociworker.core.oci import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Descriptor,
    Layer,
)
from ociworker.diff import CompressionOpts, LayerApplier, LayerComparer, write_dir_layer
from ociworker.diff.tarutil import ParallelGzip
from ociworker.errors import ConfigError, DigestMismatchError

NS = 1_000_000_000


def bind(path: Path) -> list[Mount]:
    return [Mount("bind", str(path), ("rbind", "rw"))]


def xattrs_supported(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a" / "f").write_bytes(b"hello\n")
    (root / "a" / "b" / "big").write_bytes(os.urandom(200 * 1024))
    (root / "exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec", 0o4755)
    (root / "a" / "l").symlink_to("f")
    (root / "abs").symlink_to("/etc/passwd")
    (root / "dirlink").symlink_to("a")
    os.link(root / "a" / "f", root / "a" / "h")
    os.mkfifo(root / "p", 0o640)
    (root / "ü-ñame.txt").write_bytes(b"unicode")
    long_dir = root / ("d" * 90) / ("e" * 90)
    long_dir.mkdir(parents=True)
    (long_dir / "long-file").write_bytes(b"long")
    if xattrs_supported(root):
        os.setxattr(root / "a" / "f", "user.test", b"v\x00\xff")
        os.setxattr(root / "a" / "b", "user.dir", b"d")
    os.chmod(root / "a" / "b", 0o750)
    # sub-second mtimes everywhere; parents last so children do not bump them
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            times = (1_600_000_000 * NS + 123, 1_600_000_000 * NS + 456_789)
            os.utime(Path(dirpath, name), ns=times, follow_symlinks=False)


def copy_tree(src: Path, dst: Path) -> None:
    # cp -a keeps hardlinks, fifos, xattrs and sub-second times, which copytree does not
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


def snapshot(root: Path, *, links: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything a layer must carry, per path (mtimes in whole seconds)."""
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
            try:
                xattrs = tuple(
                    (k, os.getxattr(p, k, follow_symlinks=False))
                    for k in sorted(os.listxattr(p, follow_symlinks=False))
                    if not k.startswith("trusted.overlay.")
                )
            except OSError:
                xattrs = ()
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns // NS,
                xattrs,
                *extra,
            )
    if links:
        for names in groups.values():
            for n in names:
                out[n] = (*out[n], tuple(sorted(names)))
    return out


def tar_names(blob: bytes, media_type: str) -> list[str]:
    raw = uncompress(blob, media_type)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return [m.name for m in tf.getmembers()]


def uncompress(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.decompress(blob)
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    return blob


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


@pytest.mark.parametrize(
    ("opts", "media_type"),
    [
        (CompressionOpts(), OCI_LAYER_GZIP),
        (CompressionOpts("zstd"), OCI_LAYER_ZSTD),
        (CompressionOpts("zstd", level=19), OCI_LAYER_ZSTD),
        (CompressionOpts("uncompressed"), OCI_LAYER),
        (CompressionOpts("gzip", oci_media_types=False), DOCKER_LAYER_GZIP),
        (CompressionOpts("uncompressed", oci_media_types=False), DOCKER_LAYER),
    ],
)
async def test_dir_layer_round_trip(
    tmp_path: Path, store: ContentStore, opts: CompressionOpts, media_type: str
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    layer = write_dir_layer(store, src, opts)
    assert layer.descriptor.media_type == media_type

    blob = store.read(layer.descriptor.digest)
    assert layer.descriptor.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert layer.descriptor.size == len(blob)
    raw = uncompress(blob, media_type)
    assert layer.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()

    names = tar_names(blob, media_type)
    assert names == sorted(names, key=lambda n: [os.fsencode(c) for c in n.split("/")])
    assert len(names) == len(snapshot(src))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert tf.getmember("a/h").islnk() and tf.getmember("a/h").linkname == "a/f"
        assert tf.getmember("exec").mode == 0o4755

    dst = tmp_path / "dst"
    dst.mkdir()
    diff_id = await LayerApplier(store).apply(layer.descriptor, bind(dst))
    assert diff_id == layer.diff_id
    assert snapshot(dst) == snapshot(src)


async def test_layer_is_deterministic(tmp_path: Path, store: ContentStore) -> None:
    src = tmp_path / "src"
    make_tree(src)
    first = write_dir_layer(store, src, CompressionOpts())
    assert write_dir_layer(store, src, CompressionOpts()) == first
    # a tree rebuilt from the layer (new inodes, new ctimes) gives the same blob
    copy = tmp_path / "copy"
    copy.mkdir()
    await LayerApplier(store).apply(first.descriptor, bind(copy))
    assert write_dir_layer(store, copy, CompressionOpts()) == first


def test_zstd_needs_oci_media_types(tmp_path: Path, store: ContentStore) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(ConfigError):
        write_dir_layer(store, tmp_path / "src", CompressionOpts("zstd", oci_media_types=False))


def test_failed_layer_leaves_no_ingest(tmp_path: Path, store: ContentStore) -> None:
    with pytest.raises(ConfigError):
        write_dir_layer(store, tmp_path, CompressionOpts("gzip", level=42))
    assert list(store.ingest_dir.iterdir()) == []
    assert list(store.walk()) == []


async def test_compare_double_walk(tmp_path: Path, store: ContentStore) -> None:
    lower = tmp_path / "lower"
    make_tree(lower)
    upper = tmp_path / "upper"
    copy_tree(lower, upper)
    (upper / "a" / "new").write_bytes(b"new file")
    (upper / "a" / "b" / "big").write_bytes(os.urandom(200 * 1024))
    (upper / "exec").unlink()
    (upper / "empty").rmdir()
    (upper / "dirlink").unlink()
    (upper / "dirlink").mkdir()
    (upper / "dirlink" / "inside").write_bytes(b"x")
    os.chmod(upper / "a" / "f", 0o600)

    layer = await LayerComparer(store).compare(bind(lower), bind(upper), CompressionOpts())
    names = tar_names(store.read(layer.descriptor.digest), layer.descriptor.media_type)
    assert names == [
        "a",
        "a/b",
        "a/b/big",
        "a/f",
        "a/h",
        "a/new",
        "dirlink",
        "dirlink/inside",
        ".wh.empty",
        ".wh.exec",
    ]

    # applying the diff on top of the lower tree gives the upper tree
    target = tmp_path / "target"
    target.mkdir()
    base = write_dir_layer(store, lower, CompressionOpts())
    applier = LayerApplier(store)
    await applier.apply(base.descriptor, bind(target))
    assert await applier.apply(layer.descriptor, bind(target)) == layer.diff_id
    assert snapshot(target) == snapshot(upper)


async def test_compare_identical_trees_is_empty(tmp_path: Path, store: ContentStore) -> None:
    lower = tmp_path / "lower"
    make_tree(lower)
    upper = tmp_path / "upper"
    copy_tree(lower, upper)
    layer = await LayerComparer(store).compare(bind(lower), bind(upper), CompressionOpts())
    assert tar_names(store.read(layer.descriptor.digest), layer.descriptor.media_type) == []


async def test_compare_same_size_same_second_detects_content(
    tmp_path: Path, store: ContentStore
) -> None:
    # a filesystem that truncates mtimes to seconds hides a same-size rewrite
    # from stat; the comparer must then look at the bytes
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (lower / "f").write_bytes(b"aaaa")
    (upper / "f").write_bytes(b"bbbb")
    (lower / "same").write_bytes(b"cccc")
    (upper / "same").write_bytes(b"cccc")
    for p in (lower / "f", upper / "f", lower / "same", upper / "same"):
        os.utime(p, ns=(1_700_000_000 * NS, 1_700_000_000 * NS))
    layer = await LayerComparer(store).compare(bind(lower), bind(upper), CompressionOpts())
    assert tar_names(store.read(layer.descriptor.digest), layer.descriptor.media_type) == ["f"]


async def test_compare_empty_lower_is_whole_dir(tmp_path: Path, store: ContentStore) -> None:
    src = tmp_path / "src"
    make_tree(src)
    layer = await LayerComparer(store).compare([], bind(src), CompressionOpts("zstd"))
    assert layer == write_dir_layer(store, src, CompressionOpts("zstd"))


async def test_apply_detects_corrupt_blob(tmp_path: Path, store: ContentStore) -> None:
    src = tmp_path / "src"
    make_tree(src)
    layer = write_dir_layer(store, src, CompressionOpts("uncompressed"))
    path = store.blob_path(layer.descriptor.digest)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the end-of-archive padding: the tar still parses
    path.write_bytes(bytes(data))
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(DigestMismatchError):
        await LayerApplier(store).apply(layer.descriptor, bind(dst))


async def test_apply_checks_uncompressed_annotation(tmp_path: Path, store: ContentStore) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    layer = write_dir_layer(store, src, CompressionOpts())
    d = layer.descriptor
    wrong = Descriptor(d.media_type, d.digest, d.size, (("containerd.io/uncompressed", d.digest),))
    right = Descriptor(
        d.media_type, d.digest, d.size, (("containerd.io/uncompressed", layer.diff_id),)
    )
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(DigestMismatchError):
        await LayerApplier(store).apply(wrong, bind(dst))
    assert await LayerApplier(store).apply(right, bind(dst)) == layer.diff_id


def test_layer_value_shape(tmp_path: Path, store: ContentStore) -> None:
    (tmp_path / "src").mkdir()
    layer = write_dir_layer(store, tmp_path / "src", CompressionOpts("uncompressed"))
    assert isinstance(layer, Layer)
    # an empty tree is just the end-of-archive marker
    assert store.read(layer.descriptor.digest) == b"\0" * 1024
    assert layer.diff_id == layer.descriptor.digest


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_gzip_is_one_valid_stream(workers: int) -> None:
    data = os.urandom(ParallelGzip.BLOCK) + b"abc" * ParallelGzip.BLOCK + os.urandom(1000)
    with ThreadPoolExecutor(workers) as pool:
        gz = ParallelGzip(6, pool, workers)
        out = b"".join(gz.compress(data[i : i + 70_000]) for i in range(0, len(data), 70_000))
        out += gz.flush()
    assert gzip.decompress(out) == data
    # gzip(1) checks the CRC and length trailer as well
    subprocess.run(["gzip", "-t"], input=out, check=True)
    # the same bytes whatever the number of threads
    with ThreadPoolExecutor(1) as pool:
        single = ParallelGzip(6, pool, 1)
        assert single.compress(data) + single.flush() == out


def test_parallel_gzip_empty_stream() -> None:
    with ThreadPoolExecutor(2) as pool:
        out = ParallelGzip(6, pool, 2).flush()
    assert gzip.decompress(out) == b""
