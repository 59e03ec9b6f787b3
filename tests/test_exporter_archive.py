from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from ociworker.content.store import ContentStore
from ociworker.core.oci import OCI_INDEX
from ociworker.errors import DigestMismatchError, UnsupportedError, UserError
from ociworker.exporter import ocilayout
from ociworker.exporter.image import ImageResult, write_image
from ociworker.exporter.ocilayout import export_docker_archive, export_oci_archive
from test_exporter_helpers import base_config, make_layer


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


@pytest.fixture
def image(store: ContentStore) -> ImageResult:
    layers = [make_layer(store, {"a": b"1" * 5000}), make_layer(store, {"b": b"2"})]
    return write_image(store, base_config(2), layers)


def _through_pipe(write: Callable[[BinaryIO], None]) -> dict[str, bytes]:
    """Run ``write`` into a real (unseekable) pipe; return the tar's members."""
    r, w = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")))
    reader.start()
    try:
        with open(w, "wb") as out:
            write(out)
    finally:
        reader.join()
        os.close(r)
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:") as tar:
        for m in tar:
            f = tar.extractfile(m)
            members[m.name] = f.read() if f else b""
    return members


def _check_blobs(members: dict[str, bytes], image: ImageResult) -> None:
    digests = {image.manifest.digest, image.config.digest}
    digests |= {la.descriptor.digest for la in image.layers}
    for d in digests:
        data = members[f"blobs/sha256/{d.split(':')[1]}"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d


def test_oci_archive(store: ContentStore, image: ImageResult) -> None:
    members = _through_pipe(
        lambda out: export_oci_archive(store, image, ["foo", "example.com/x/y:1"], out)
    )
    names = list(members)
    assert names == sorted(names)
    assert names[:2] == ["blobs", "blobs/sha256"]
    assert "manifest.json" not in members
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(members["index.json"])
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    assert [m["annotations"] for m in index["manifests"]] == [
        {
            "io.containerd.image.name": "docker.io/library/foo:latest",
            "org.opencontainers.image.ref.name": "latest",
        },
        {
            "io.containerd.image.name": "example.com/x/y:1",
            "org.opencontainers.image.ref.name": "1",
        },
    ]
    assert all(m["digest"] == image.manifest.digest for m in index["manifests"])
    _check_blobs(members, image)
    assert len([n for n in names if n.startswith("blobs/sha256/")]) == 4


def test_oci_archive_without_name(store: ContentStore, image: ImageResult) -> None:
    members = _through_pipe(lambda out: export_oci_archive(store, image, [], out))
    index = json.loads(members["index.json"])
    assert index["manifests"] == [image.manifest.to_json()]


def test_docker_archive(store: ContentStore, image: ImageResult) -> None:
    members = _through_pipe(
        lambda out: export_docker_archive(store, image, ["docker.io/library/foo:v1", "bar"], out)
    )
    (entry,) = json.loads(members["manifest.json"])
    assert entry["Config"] == f"blobs/sha256/{image.config.digest.split(':')[1]}"
    assert entry["Layers"] == [
        f"blobs/sha256/{la.descriptor.digest.split(':')[1]}" for la in image.layers
    ]
    assert entry["RepoTags"] == ["foo:v1", "bar:latest"]
    hex_id = image.config.digest.split(":")[1]
    assert json.loads(members["repositories"]) == {
        "foo": {"v1": hex_id},
        "bar": {"latest": hex_id},
    }
    assert "index.json" in members and "oci-layout" in members
    _check_blobs(members, image)


def test_docker_archive_refuses_zstd(store: ContentStore) -> None:
    img = write_image(store, base_config(1), [make_layer(store, {"a": b"1"}, zstd=True)])
    out = io.BytesIO()
    with pytest.raises(UnsupportedError, match="zstd"):
        export_docker_archive(store, img, ["foo"], out)
    assert out.getvalue() == b""


def test_corrupt_blob_is_detected(store: ContentStore, image: ImageResult) -> None:
    path = store.blob_path(image.layers[0].descriptor.digest)
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[:-1])
    out = io.BytesIO()
    with pytest.raises(DigestMismatchError, match="bytes"):
        export_oci_archive(store, image, [], out)
    assert out.getvalue() == b"", "nothing may be written before sizes are checked"
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DigestMismatchError, match="now hashes to"):
        export_oci_archive(store, image, [], out)
    # what was written must not pass as a complete archive holding the bad blob
    bad = f"blobs/sha256/{image.layers[0].descriptor.digest.split(':')[1]}"
    with (
        pytest.raises(tarfile.ReadError),
        tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar,
    ):
        for member in tar:
            f = tar.extractfile(member)
            if f is not None and member.name == bad:
                f.read()


@pytest.mark.parametrize(
    ("name", "full", "familiar"),
    [
        ("foo", "docker.io/library/foo:latest", "foo:latest"),
        ("docker.io/library/foo:1", "docker.io/library/foo:1", "foo:1"),
        ("user/repo", "docker.io/user/repo:latest", "user/repo:latest"),
        ("docker.io/library/a/b:2", "docker.io/library/a/b:2", "library/a/b:2"),
        ("localhost:5000/a/b", "localhost:5000/a/b:latest", "localhost:5000/a/b:latest"),
        ("ghcr.io/o/r:t", "ghcr.io/o/r:t", "ghcr.io/o/r:t"),
        ("localhost/r:t", "localhost/r:t", "localhost/r:t"),
    ],
)
def test_names(name: str, full: str, familiar: str) -> None:
    assert ocilayout._full_name(name) == full
    assert ocilayout._familiar(name) == familiar


@pytest.mark.parametrize(
    "bad", ["", "Foo", "foo@sha256:00", "foo:", "a b", "foo@sha256:" + "a" * 64]
)
def test_bad_names(bad: str) -> None:
    with pytest.raises(UserError):
        ocilayout._full_name(bad)
