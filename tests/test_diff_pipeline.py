"""The applier's read pipeline: a decompressing thread feeding a forward-only
reader under tarfile. Expectations come from the tar and blob bytes the tests
make themselves (hashlib over them), never from the pipeline."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import random
import subprocess
import tarfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from ociworker.content.store import ContentStore, Ingest
from ociworker.core.digest import Digest
from ociworker.core.oci import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor
from ociworker.diff import CompressionOpts, write_dir_layer
from ociworker.diff.apply import apply_blob, apply_tar_stream
from ociworker.diff.tarutil import (
    DecompressingPipe,
    ForwardReader,
    ParallelGzip,
    _incompressible,
)
from ociworker.errors import DigestMismatchError, HostError, UnsafePathError, UserError


def _sha(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def _tar(files: dict[str, bytes], *, hostile_last: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
        if hostile_last:
            ti = tarfile.TarInfo("evil")
            ti.type = tarfile.LNKTYPE
            ti.linkname = "../../outside"
            tf.addfile(ti)
    return buf.getvalue()


def _compress(tar: bytes, media_type: str) -> bytes:
    if media_type == OCI_LAYER_GZIP:
        return gzip.compress(tar, mtime=0)
    if media_type == OCI_LAYER_ZSTD:
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def _store_blob(tmp_path: Path, blob: bytes, media_type: str) -> tuple[ContentStore, Descriptor]:
    store = ContentStore(tmp_path / "content")
    digest = store.put(blob)
    return store, Descriptor(media_type, digest, len(blob))


def _decompress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "decompress"]


def test_forward_reader_returns_the_stream_in_any_read_sizes() -> None:
    data = random.Random(7).randbytes(3 * (1 << 20) + 4321)
    rnd = random.Random(11)
    reader = ForwardReader(io.BytesIO(data))
    got = bytearray()
    while True:
        n = rnd.choice([0, 1, 511, 512, 10_000, 1 << 20, 3 << 20])
        chunk = reader.read(n)
        if n and not chunk:
            break
        assert len(chunk) <= n
        got += chunk
        assert reader.tell() == len(got)
    assert bytes(got) == data


def test_forward_reader_seeks_forward_and_refuses_backwards() -> None:
    data = bytes(range(256)) * 100
    reader = ForwardReader(io.BytesIO(data))
    assert reader.read(10) == data[:10]
    assert reader.seek(5000) == 5000
    assert reader.read(3) == data[5000:5003]
    with pytest.raises(OSError):
        reader.seek(100)
    assert reader.read(-1) == data[5003:]


@pytest.mark.parametrize("media_type", [OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD])
def test_apply_blob_extracts_and_returns_the_diff_id(tmp_path: Path, media_type: str) -> None:
    rnd = random.Random(3)
    files = {f"d/f{i}": rnd.randbytes(rnd.choice([0, 1, 700, 70_000])) for i in range(300)}
    files["big"] = rnd.randbytes(5 << 20)  # more than the pipe's queue holds
    # zero padding after the end-of-archive blocks counts in the diffID
    tar = _tar(files) + bytes(4096)
    store, desc = _store_blob(tmp_path, _compress(tar, media_type), media_type)
    root = tmp_path / "root"
    root.mkdir()
    assert apply_blob(store, desc, root) == _sha(tar)
    for name, data in files.items():
        assert (root / name).read_bytes() == data
    assert not _decompress_threads()


def test_hostile_entry_after_a_large_file_fails_without_leaving_a_thread(tmp_path: Path) -> None:
    files = {"big": random.Random(5).randbytes(12 << 20)}
    tar = _tar(files, hostile_last=True)
    store, desc = _store_blob(tmp_path, _compress(tar, OCI_LAYER_GZIP), OCI_LAYER_GZIP)
    root = tmp_path / "a" / "root"
    root.mkdir(parents=True)
    with pytest.raises(UnsafePathError, match="evil"):
        apply_blob(store, desc, root)
    assert not (tmp_path / "outside").exists()
    assert not _decompress_threads()


def test_failing_extraction_mid_stream_stops_the_thread(tmp_path: Path) -> None:
    # the reader gives up while the thread still has megabytes to decompress
    blob = gzip.compress(bytes(64 << 20), compresslevel=1, mtime=0)
    pipe = DecompressingPipe(io.BytesIO(blob), OCI_LAYER_GZIP, depth=2)
    assert pipe.read(1 << 20)
    pipe.close()
    assert not _decompress_threads()


def test_truncated_gzip_is_a_user_error(tmp_path: Path) -> None:
    blob = gzip.compress(_tar({"a": b"x" * 100_000}), mtime=0)
    store, desc = _store_blob(tmp_path, blob[: len(blob) // 2], OCI_LAYER_GZIP)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UserError, match="corrupt compressed stream"):
        apply_blob(store, desc, root)
    assert not _decompress_threads()


def test_blob_changed_in_the_store_is_detected(tmp_path: Path) -> None:
    tar = _tar({"a": b"hello\n"})
    blob = gzip.compress(tar, mtime=0)
    store, desc = _store_blob(tmp_path, blob, OCI_LAYER_GZIP)
    # the store's file rots after it was verified: the applier reads it back
    path = next(
        p
        for p in (tmp_path / "content").rglob("*")
        if p.is_file() and p.stat().st_size == len(blob)
    )
    os.chmod(path, 0o644)
    # zero padding after the gzip member: gzip ignores it, the blob digest must not
    path.write_bytes(blob + bytes(16))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DigestMismatchError, match="read back as"):
        apply_blob(store, desc, root)


def _layer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("layer-")]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "uncompressed"])
def test_written_layer_digests_match_its_bytes(tmp_path: Path, compression: str) -> None:
    rnd = random.Random(4)
    tree = tmp_path / "tree"
    for i in range(120):  # many small entries (batched) and big ones (passed through)
        (tree / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 7}" / f"f{i}").write_bytes(rnd.randbytes(rnd.choice([3, 900, 300_000])))
    store = ContentStore(tmp_path / "content")
    layer = write_dir_layer(store, tree, CompressionOpts(compression=compression))  # type: ignore[arg-type]
    with store.open(layer.descriptor.digest) as f:
        blob = f.read()
    assert layer.descriptor.digest == _sha(blob) and layer.descriptor.size == len(blob)
    if compression == "gzip":
        tar = gzip.decompress(blob)
    elif compression == "zstd":
        tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    else:
        tar = blob
    assert layer.diff_id == _sha(tar)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        names = {m.name for m in tf.getmembers() if m.isfile()}
    assert names == {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}
    assert not _layer_threads()


def test_a_failing_blob_write_fails_the_layer_and_stops_every_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(8):
        (tree / f"f{i}").write_bytes(random.Random(i).randbytes(2 << 20))
    written = 0
    real_write = Ingest.write

    def full_disk(self: Ingest, data: bytes) -> None:
        nonlocal written
        written += len(data)
        if written > (4 << 20):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(Ingest, "write", full_disk)
    store = ContentStore(tmp_path / "content")
    # the error raised on the blob stage's thread still names the content store
    with pytest.raises(
        HostError, match=r"^cannot write the layer into the content store: no space left on device$"
    ):
        write_dir_layer(store, tree, CompressionOpts(compression="gzip"))
    assert not _layer_threads()
    assert not any(store.ingest_dir.iterdir())  # the partial blob is gone


def _pgzip(data: bytes, workers: int = 2) -> bytes:
    with ThreadPoolExecutor(workers) as pool:
        gz = ParallelGzip(6, pool, workers)
        return gz.compress(data) + gz.flush()


def test_gzip_stores_incompressible_blocks_and_deflates_the_rest() -> None:
    rnd = random.Random(2)
    noise = rnd.randbytes(3 * ParallelGzip.BLOCK)
    text = b"".join(b"line %d of a text file\n" % i for i in range(200_000))
    # a block half noise, half text: one probe finds text, so it is deflated
    half = noise[: ParallelGzip.BLOCK // 2] + text[: ParallelGzip.BLOCK // 2]
    for data in (noise, text, half, noise + text + half):
        out = _pgzip(data)
        assert gzip.decompress(out) == data
        subprocess.run(["gzip", "-t"], input=out, check=True)
        assert _pgzip(data, workers=1) == out
    # noise is stored (deflate would have found nothing to shrink either), the rest deflated
    assert _incompressible(noise[: ParallelGzip.BLOCK])
    assert not _incompressible(text[: ParallelGzip.BLOCK])
    assert not _incompressible(half)
    assert len(_pgzip(noise)) <= len(noise) * 1.001 + 64
    # deflated as ever: zlib's own level 6 on the whole text is the yardstick
    assert len(_pgzip(text)) < 1.05 * len(zlib.compress(text, 6))
    assert len(_pgzip(half)) < 0.6 * len(half)


def _entries_tar(*entries: tuple[str, str, str]) -> io.BytesIO:
    """(kind, name, data or link target) entries, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, arg in entries:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(arg), 0o644
                tf.addfile(ti, io.BytesIO(arg.encode()))
    buf.seek(0)
    return buf


def test_a_dir_replaced_by_a_symlink_mid_layer_is_followed_by_later_entries(
    tmp_path: Path,
) -> None:
    # "a" is resolved as a plain dir for a/f; then it becomes a symlink to b, so
    # a/g is b/g: no answer about "a" from before may outlive the symlink
    root = tmp_path / "root"
    root.mkdir()
    tar = _entries_tar(
        ("dir", "b", ""),
        ("dir", "a", ""),
        ("reg", "a/f", "one"),
        ("sym", "a", "b"),
        ("reg", "a/g", "two"),
        ("reg", ".wh.a", ""),
        ("dir", "a", ""),
        ("reg", "a/h", "three"),
    )
    apply_tar_stream(tar, root)
    assert (root / "b" / "g").read_text() == "two"
    assert not (root / "a").is_symlink()
    assert sorted(p.name for p in (root / "a").iterdir()) == ["h"]
    assert (root / "a" / "h").read_text() == "three"
    assert sorted(p.name for p in (root / "b").iterdir()) == ["g"]


def test_gzip_stores_a_tree_of_small_incompressible_files(tmp_path: Path) -> None:
    # 40 KiB random files: every block holds tar headers, which must not make
    # the block look worth deflating
    rnd = random.Random(8)
    files = {f"f{i}": rnd.randbytes(40_000) for i in range(60)}
    tar = _tar(files)
    blocks = [tar[i : i + ParallelGzip.BLOCK] for i in range(0, len(tar), ParallelGzip.BLOCK)]
    assert all(_incompressible(b) for b in blocks[:-1])
    out = _pgzip(tar)
    assert gzip.decompress(out) == tar
