"""The oci and docker archives are byte for byte what Python's tarfile stream
writer makes of the same members: the archive writer skips tarfile for speed,
never for a different format."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from ociworker.content.store import ContentStore
from ociworker.diff import CompressionOpts, write_dir_layer
from ociworker.errors import DigestMismatchError
from ociworker.exporter.image import ImageResult, write_image
from ociworker.exporter.ocilayout import export_docker_archive, export_oci_archive


def _image(tmp_path: Path) -> tuple[ContentStore, ImageResult]:
    store = ContentStore(tmp_path / "content")
    layers = []
    # blob sizes on and off the 512-byte blocks, one over the 1 MiB copy chunk
    for i, size in enumerate([0, 1, 511, 513, (1 << 20) + 7]):
        tree = tmp_path / f"t{i}"
        tree.mkdir()
        (tree / "f").write_bytes(random.Random(i).randbytes(size))
        layers.append(write_dir_layer(store, tree, CompressionOpts(compression="uncompressed")))
    config = {"architecture": "amd64", "os": "linux", "config": {}}
    return store, write_image(store, config, layers, oci_media_types=False)


def _as_tarfile_writes_it(archive: bytes) -> bytes:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as src,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as dst,
    ):
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue()


@pytest.mark.parametrize("export", [export_oci_archive, export_docker_archive])
def test_archive_bytes_are_tarfiles(tmp_path: Path, export: object) -> None:
    store, image = _image(tmp_path)
    buf = io.BytesIO()
    export(store, image, ["example.com/a:b"], buf)  # type: ignore[operator]
    data = buf.getvalue()
    assert data == _as_tarfile_writes_it(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        blobs = {m.name for m in tf.getmembers() if m.name.startswith("blobs/sha256/")}
    want = {image.manifest, image.config, *(la.descriptor for la in image.layers)}
    assert {"blobs/sha256/" + d.digest.removeprefix("sha256:") for d in want} <= blobs


def test_a_blob_rotted_in_the_store_cuts_the_archive_short(tmp_path: Path) -> None:
    store, image = _image(tmp_path)
    big = max(image.layers, key=lambda la: la.descriptor.size).descriptor
    path = store.blob_path(big.digest)
    os.chmod(path, 0o644)
    with path.open("r+b") as f:  # same size, other bytes
        f.seek(100)
        f.write(b"X")
    buf = io.BytesIO()
    with pytest.raises(DigestMismatchError, match="now hashes to"):
        export_oci_archive(store, image, ["example.com/a:b"], buf)
    # cut short inside that blob: never a well-formed archive holding a corrupt blob
    data = buf.getvalue()
    assert not data.endswith(bytes(2 * tarfile.BLOCKSIZE))
    name = "blobs/sha256/" + big.digest.removeprefix("sha256:")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf, pytest.raises(tarfile.ReadError):
        for member in tf:
            if member.name == name:
                reader = tf.extractfile(member)
                assert reader is not None
                reader.read()
