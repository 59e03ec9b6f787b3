"""Hostile layer tars against the applier's bounds (issue 18 item 4), without root: a
PAX or GNU long-name record claiming 1 GiB is refused before it is read, a stream of many
entries is not kept in memory, a decompression bomb stops at its ratio bound, and
extraction stops at the disk reserve. The bounds are ``ociworker.diff.tarutil``'s."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from ociworker.content.store import ContentStore
from ociworker.core.oci import OCI_LAYER_ZSTD, Descriptor
from ociworker.diff import tarutil
from ociworker.diff.apply import apply_blob, apply_tar_stream
from ociworker.errors import HostError, UserError

_GIB = 1 << 30


class _Stream:
    """``head`` then ``zeros`` zero bytes, made as they are read (never held)."""

    def __init__(self, head: bytes, zeros: int, tail: bytes = b"") -> None:
        self._head = head
        self._zeros = zeros
        self._tail = tail
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        n = 1 << 20 if n < 0 else n
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
        elif self._zeros:
            k = min(n, self._zeros)
            self._zeros -= k
            out = bytes(k)
        else:
            out, self._tail = self._tail[:n], self._tail[n:]
        self.read_bytes += len(out)
        return out


def _header(name: str, size: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    "kind",
    [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK],
    ids=["pax", "pax-global", "gnu-longname", "gnu-longlink"],
)
def test_a_1gib_header_record_is_refused_before_it_is_read(tmp_path: Path, kind: bytes) -> None:
    stream = _Stream(_header("././@Huge", _GIB, kind), _GIB)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=f"record of {_GIB} bytes is larger than the 1048576"):
            apply_tar_stream(stream, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # tarfile would have held the whole GiB
    assert stream.read_bytes < 4 << 20
    assert list(tmp_path.iterdir()) == []


def test_a_record_at_the_limit_is_read(tmp_path: Path) -> None:
    # a 1 MiB PAX comment record is legal (Go's archive/tar takes it too)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * ((1 << 20) - 100)}
        tf.addfile(info, io.BytesIO(b""))
    buf.seek(0)
    apply_tar_stream(buf, tmp_path)
    assert (tmp_path / "f").read_bytes() == b""


def test_members_of_a_stream_are_not_kept(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(2000):
            tf.addfile(tarfile.TarInfo(f"e{i}"), io.BytesIO(b""))
    buf.seek(0)
    kept = []
    with tarfile.open(fileobj=buf, mode="r|", tarinfo=tarutil.BoundedTarInfo) as tar:
        names = []
        for m in tarutil.iter_members(tar):
            names.append(m.name)
            kept.append(len(tar.members))  # type: ignore[attr-defined]
    assert names == [f"e{i}" for i in range(2000)]
    assert max(kept) <= 1


def _zstd(data_parts: list[bytes], zeros: int) -> bytes:
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False) as w:
        for part in data_parts:
            w.write(part)
        chunk = bytes(1 << 20)
        while zeros > 0:
            w.write(chunk[: min(zeros, len(chunk))])
            zeros -= len(chunk)
    return out.getvalue()


def test_a_zstd_bomb_stops_at_the_ratio_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the floor lowered to 8 MiB so the test decompresses little; the ratio is the real one
    monkeypatch.setattr(tarutil, "BOMB_FLOOR", 8 << 20)
    tar = _header("hello", 5, tarfile.REGTYPE) + b"hello" + bytes(507) + bytes(1024)
    blob = _zstd([tar], 64 << 20)  # the zeros come after the tar's end
    assert len(blob) * tarutil.BOMB_RATIO < 8 << 20
    store = ContentStore(tmp_path / "store")
    desc = Descriptor(OCI_LAYER_ZSTD, store.put(blob), len(blob))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(tarutil.DecompressionBombError, match="decompresses to more than 8388608"):
        apply_blob(store, desc, root)


def test_an_honest_layer_under_the_floor_is_applied(tmp_path: Path) -> None:
    tar = _header("hello", 5, tarfile.REGTYPE) + b"hello" + bytes(507) + bytes(1024)
    blob = _zstd([tar], 4 << 20)  # ratio far over 1100:1, but under the first GiB
    store = ContentStore(tmp_path / "store")
    desc = Descriptor(OCI_LAYER_ZSTD, store.put(blob), len(blob))
    root = tmp_path / "root"
    root.mkdir()
    apply_blob(store, desc, root)
    assert (root / "hello").read_bytes() == b"hello"


def test_extraction_stops_at_the_disk_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a reserve as large as the whole filesystem: the first look at the disk stops it
    monkeypatch.setattr(tarutil, "RESERVE_FRACTION", 1.0)
    monkeypatch.setattr(tarutil, "RESERVE_MAX", 1 << 62)
    size = 20 << 20
    tar = _header("big", size, tarfile.REGTYPE)
    blob = _zstd([tar], size)
    store = ContentStore(tmp_path / "store")
    desc = Descriptor(OCI_LAYER_ZSTD, store.put(blob), len(blob))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(HostError, match="no space left on device") as err:
        apply_blob(store, desc, root)
    assert desc.digest in str(err.value)
    # it stopped at the first look (after 1 MiB), not at the file's end
    assert (root / "big").stat().st_size <= 2 << 20


# --- GNU sparse maps ----------------------------------------------------------------------


def _old_sparse_header(name: str, extended: bool, origsize: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    # one sparse struct (offset 0, 512 bytes) in the header, then the chain flag
    buf[386:398] = b"%011o\0" % 0
    buf[398:410] = b"%011o\0" % 512
    buf[482] = 1 if extended else 0
    buf[483:495] = b"%011o\0" % origsize
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf)


def _extension_block(more: bool) -> bytes:
    block = bytearray(512)
    for i in range(21):
        block[i * 24 : i * 24 + 12] = b"%011o\0" % (1024 + i)
        block[i * 24 + 12 : i * 24 + 24] = b"%011o\0" % 1
    block[504] = 1 if more else 0
    return bytes(block)


class _Chain:
    """An old GNU sparse header followed by ``n`` chained extension blocks, made as read."""

    def __init__(self, n: int) -> None:
        self._head = _old_sparse_header("sparse", True, 1 << 40)
        self._n = n
        self._buf = b""

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size < 0 else size
        while len(self._buf) < size and (self._head or self._n):
            if self._head:
                self._buf += self._head
                self._head = b""
            else:
                self._n -= 1
                self._buf += _extension_block(self._n > 0)
        out, self._buf = self._buf[:size], self._buf[size:]
        return out


def test_an_endless_old_gnu_sparse_map_is_refused(tmp_path: Path) -> None:
    stream = _Chain(2_000_000)  # a GiB of extension blocks: 42 million entries
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="GNU sparse map of more than"):
            apply_tar_stream(stream, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    assert list(tmp_path.iterdir()) == []


def test_a_pax_sparse_map_announcing_a_billion_entries_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("sparse")
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "sparse",
            "GNU.sparse.realsize": str(1 << 40),
        }
        data = b"1000000000\n" + b"0\n1\n" * 100
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    with pytest.raises(UserError, match="GNU sparse map of more than"):
        apply_tar_stream(buf, tmp_path)


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_files_still_extract(tmp_path: Path, fmt: str) -> None:
    # what GNU tar itself writes (old format, and PAX 1.0): the bounded parser reads it
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.fail("GNU tar is part of the host (coreutils' companion on Debian)")
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse"
    with sparse.open("wb") as f:
        for i in range(12):  # more holes than the header's 4 structs: extension blocks
            f.seek(i * (1 << 20))
            f.write(b"data%d" % i)
        f.truncate(13 << 20)
    extra = ["--sparse-version=1.0"] if fmt == "posix" else []
    archive = tmp_path / "a.tar"
    subprocess.run(
        ["tar", "-S", f"--format={fmt}", *extra, "-cf", str(archive), "-C", str(src), "sparse"],
        check=True,
    )
    root = tmp_path / "root"
    root.mkdir()
    with archive.open("rb") as f:
        apply_tar_stream(f, root)
    assert (root / "sparse").read_bytes() == sparse.read_bytes()
