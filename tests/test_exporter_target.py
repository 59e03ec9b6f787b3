"""ExportTarget writers: atomic archives, the layers layout, the local tar round trip."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import tarfile
from pathlib import Path

import pytest

from ociworker.core.digest import sha256_bytes
from ociworker.core.oci import (
    ANNOTATION_STEP_INDEX,
    ANNOTATION_UNCOMPRESSED,
    ANNOTATION_VERTEX_DIGEST,
    ANNOTATION_VERTEX_NAME,
    OCI_LAYER_GZIP,
    Descriptor,
)
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import LayerCommitted
from ociworker.errors import ConfigError, DigestMismatchError
from ociworker.exporter.fs import export_local, export_tar
from ociworker.exporter.target import (
    LocalExportTarget,
    layer_file_name,
    open_archive_dest,
    write_layer,
    write_local_tar,
)
from ociworker.progress_ui import PlainPrinter, RawJSONPrinter

ROOT = os.geteuid() == 0
MTIME_NS = 1_600_000_000_123_456_789


class Boom(Exception):
    pass


# --- archives -----------------------------------------------------------------------


def test_archive_appears_whole_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "out.tar"
    dest.parent.mkdir()  # not made by the writer (buildx creates no parent)
    with LocalExportTarget().stream(OutputSpec("oci", (("dest", str(dest)),))) as f:
        f.write(b"part one ")
        assert not dest.exists()  # nobody sees a half-written archive
        f.write(b"part two")
    assert dest.read_bytes() == b"part one part two"
    assert os.listdir(dest.parent) == ["out.tar"]


def test_failing_writer_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.tar"
    with pytest.raises(Boom), open_archive_dest(str(fresh)) as f:
        f.write(b"x" * 100_000)
        raise Boom
    assert os.listdir(tmp_path) == []

    old = tmp_path / "old.tar"
    old.write_bytes(b"previous build")
    with pytest.raises(Boom), open_archive_dest(str(old)) as f:
        f.write(b"truncated")
        raise Boom
    assert old.read_bytes() == b"previous build"
    assert os.listdir(tmp_path) == ["old.tar"]


def test_dash_writes_to_stdout(tmp_path: Path) -> None:
    out = io.BytesIO()
    target = LocalExportTarget(stdout=out)
    with target.stream(OutputSpec("tar", (("dest", "-"),))) as f:
        f.write(b"streamed")
    assert out.getvalue() == b"streamed"
    assert os.listdir(tmp_path) == []


# --- output specs --------------------------------------------------------------------


def test_output_specs_for_stdout_and_layers() -> None:
    assert OutputSpec.parse("-") == OutputSpec("tar", (("dest", "-"),))
    assert OutputSpec.parse("type=oci,dest=-").to_stdout
    assert OutputSpec.parse("type=layers,dest=out,compression=zstd") == OutputSpec(
        "layers", (("compression", "zstd"), ("dest", "out"))
    )
    with pytest.raises(ConfigError, match="type=tar,dest=-"):
        OutputSpec.parse("type=local,dest=-")
    with pytest.raises(ConfigError, match="stdout"):
        OutputSpec.parse("type=layers,dest=-")
    with pytest.raises(ConfigError, match="needs dest"):
        OutputSpec.parse("type=layers")


# --- layers --------------------------------------------------------------------------


def _committed(blob: bytes, index: int = 2) -> LayerCommitted:
    digest = sha256_bytes(blob)
    annotations = {
        ANNOTATION_UNCOMPRESSED: "sha256:" + "d" * 64,
        ANNOTATION_STEP_INDEX: str(index),
        ANNOTATION_VERTEX_DIGEST: "sha256:" + "e" * 64,
        ANNOTATION_VERTEX_NAME: "[2/3] RUN echo a > /a",
    }
    desc = Descriptor(OCI_LAYER_GZIP, digest, len(blob), tuple(sorted(annotations.items())))
    return LayerCommitted(desc)


def test_layer_blob_then_descriptor(tmp_path: Path) -> None:
    blob = os.urandom(3 << 20)
    layer = _committed(blob)
    hexd = layer.descriptor.digest.split(":")[1]
    LocalExportTarget().layer(
        OutputSpec("layers", (("dest", str(tmp_path)),)), layer, io.BytesIO(blob)
    )

    assert sorted(os.listdir(tmp_path)) == [f"002-{hexd}.json", "blobs"]
    assert os.listdir(tmp_path / "blobs" / "sha256") == [hexd]
    assert (tmp_path / "blobs" / "sha256" / hexd).read_bytes() == blob
    desc = json.loads((tmp_path / layer_file_name(layer)).read_text())
    assert desc == {
        "mediaType": OCI_LAYER_GZIP,
        "digest": layer.descriptor.digest,
        "size": len(blob),
        "annotations": {
            "containerd.io/uncompressed": "sha256:" + "d" * 64,
            "dev.ociworker.step.index": "2",
            "dev.ociworker.vertex.digest": "sha256:" + "e" * 64,
            "dev.ociworker.vertex.name": "[2/3] RUN echo a > /a",
        },
    }
    # the descriptor file is the event's own JSON form, so a client can rebuild it
    assert LayerCommitted.from_json({"layer": desc}) == layer
    assert (layer.index, layer.diff_id, layer.vertex) == (
        2,
        "sha256:" + "d" * 64,
        "sha256:" + "e" * 64,
    )


def test_corrupt_layer_blob_writes_nothing(tmp_path: Path) -> None:
    layer = _committed(b"the real blob")
    with pytest.raises(DigestMismatchError):
        write_layer(tmp_path, layer, io.BytesIO(b"the real blob, corrupted"))
    assert list(tmp_path.rglob("*")) == [tmp_path / "blobs", tmp_path / "blobs" / "sha256"]


def test_layer_event_in_progress_output() -> None:
    layer = _committed(b"blob")
    plain = io.StringIO()
    PlainPrinter(plain)(layer)
    assert f"layer {layer.descriptor.digest} written (4 bytes)" in plain.getvalue()
    raw = io.StringIO()
    RawJSONPrinter(raw)(layer)
    # rawjson is BuildKit's SolveStatus: a written layer is a finished status of its step
    (status,) = json.loads(raw.getvalue())["statuses"]
    assert status["id"] == f"writing layer {layer.descriptor.digest}"
    assert status["vertex"] == "sha256:" + "e" * 64
    assert status["total"] == status["current"] == 4
    assert status["completed"]


# --- local: directory copy vs tar stream ---------------------------------------------


def _xattr_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
    except OSError:
        return False
    os.removexattr(path, "user.probe")
    return True


def _make_tree(src: Path) -> None:
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(b"#!tool\n")
    os.link(src / "bin" / "tool", src / "bin" / "tool-link")
    (src / "bin" / "sh").symlink_to("tool")
    (src / "abs-link").symlink_to("/etc/passwd")  # stays a link, never followed
    (src / "dangling").symlink_to("../../nowhere")
    (src / "empty").write_bytes(b"")
    (src / ".wh.not-a-whiteout").write_bytes(b"plain data in a plain tree")
    (src / "deep" / "er" / "est").mkdir(parents=True)
    (src / "deep" / "er" / "est" / "f").write_bytes(b"f" * 70_000)
    os.mkfifo(src / "fifo", 0o640)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))  # no tar can hold it: both forms leave it out
    if ROOT:
        os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chown(src / "bin" / "tool", 1234, 5678)
        os.lchown(src / "bin" / "sh", 42, 43)
        os.chown(src / "deep", 7, 8)
    if _xattr_supported(src / "empty"):
        os.setxattr(src / "empty", "user.note", b"\xff\x00bin")
    (src / "bin" / "tool").chmod(0o4751)  # after chown, which clears set-id bits
    (src / "ro").mkdir()
    (src / "ro" / "file").write_bytes(b"read only")
    (src / "ro").chmod(0o555)
    for i, p in enumerate(sorted(src.rglob("*"), key=lambda p: -len(p.parts))):
        if not stat.S_ISSOCK(p.lstat().st_mode):
            os.utime(p, ns=(MTIME_NS, MTIME_NS + i * 1001), follow_symlinks=False)


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything the two forms must agree on, per path."""
    out: dict[str, tuple[object, ...]] = {}
    links: dict[tuple[int, int], str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        data: object = None
        if stat.S_ISREG(st.st_mode):
            data = hashlib.sha256(p.read_bytes()).hexdigest()
            if st.st_nlink > 1:
                data = (data, links.setdefault((st.st_dev, st.st_ino), rel))
        elif stat.S_ISLNK(st.st_mode):
            data = os.readlink(p)
        elif stat.S_ISCHR(st.st_mode):
            data = st.st_rdev
        xattrs = () if p.is_symlink() else tuple(sorted(os.listxattr(p, follow_symlinks=False)))
        owner = (st.st_uid, st.st_gid) if ROOT else None
        out[rel] = (st.st_mode, st.st_mtime_ns, data, owner, xattrs)
    return out


def test_local_tar_stream_gives_the_same_tree_as_the_direct_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    direct, streamed = tmp_path / "direct", tmp_path / "streamed" / "nested"
    export_local(src, direct)
    buf = io.BytesIO()
    export_tar(src, buf)
    buf.seek(0)
    write_local_tar(buf, streamed)

    want = _snapshot(direct)
    assert "sock" not in want and ".wh.not-a-whiteout" in want
    assert want["bin/tool"][0] == stat.S_IFREG | 0o4751
    assert want["deep/er/est"][1] != want["deep"][1]  # mtimes differ per entry, to the ns
    assert _snapshot(streamed) == want
    src_view = {k: v for k, v in _snapshot(src).items() if k != "sock"}
    assert want == src_view


def test_local_tar_stream_cannot_write_outside_dest(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("escape")
        link.type = tarfile.SYMTYPE
        link.linkname = str(outside)
        tar.addfile(link)
        for name in ("escape/planted", "../climbed", "/abs"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    buf.seek(0)
    dest = tmp_path / "dest"
    write_local_tar(buf, dest)
    assert os.listdir(outside) == []
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]
    # every name was kept below dest: the symlink is resolved as if dest were /
    assert (dest / "climbed").read_bytes() == b"evil"
    assert (dest / "abs").read_bytes() == b"evil"
    assert os.readlink(dest / "escape") == str(outside)
    assert (dest / str(outside).lstrip("/") / "planted").read_bytes() == b"evil"
