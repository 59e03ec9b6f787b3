from __future__ import annotations

import json
from pathlib import Path

import pytest

from ociworker.content.image import read_image
from ociworker.content.store import ContentStore
from ociworker.core.digest import sha256_bytes
from ociworker.core.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Layer,
)
from ociworker.errors import DigestMismatchError, NotFoundError, UnsupportedError, UserError
from ociworker.exporter.image import load_image, write_image
from test_exporter_helpers import base_config, make_layer


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


def test_write_image_oci(store: ContentStore) -> None:
    l1 = make_layer(store, {"a": b"1"})
    l2 = make_layer(store, {"b": b"2"})
    config = base_config(2)
    config["rootfs"] = {"type": "layers", "diff_ids": ["stale"]}
    before = json.dumps(config, sort_keys=True)

    img = write_image(store, config, [l1, l2], annotations={"org.example": "x"})

    assert json.dumps(config, sort_keys=True) == before, "caller's config was modified"
    assert img.manifest.media_type == OCI_MANIFEST
    assert img.config.media_type == OCI_CONFIG
    assert img.layers == (l1, l2)
    raw_manifest = store.read(img.manifest.digest)
    assert sha256_bytes(raw_manifest) == img.manifest.digest
    assert len(raw_manifest) == img.manifest.size
    assert b" " not in raw_manifest

    manifest, cfg = read_image(store, img.manifest.digest)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"] == img.config.to_json()
    assert [d["digest"] for d in manifest["layers"]] == [
        l1.descriptor.digest,
        l2.descriptor.digest,
    ]
    assert manifest["annotations"] == {"org.example": "x"}
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [l1.diff_id, l2.diff_id]}
    assert cfg["os"] == "linux"


def test_write_image_is_deterministic(store: ContentStore) -> None:
    layer = make_layer(store, {"a": b"1"})
    a = write_image(store, base_config(1), [layer])
    b = write_image(store, dict(reversed(list(base_config(1).items()))), [layer])
    assert a == b


def test_docker_media_types_retype_layers(store: ContentStore) -> None:
    layer = make_layer(store, {"a": b"1"})
    assert layer.descriptor.media_type == OCI_LAYER_GZIP
    img = write_image(store, base_config(1), [layer], oci_media_types=False)
    assert img.manifest.media_type == DOCKER_MANIFEST
    assert img.config.media_type == DOCKER_CONFIG
    manifest, _ = read_image(store, img.manifest.digest)
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert [d["mediaType"] for d in manifest["layers"]] == [DOCKER_LAYER_GZIP]
    assert img.layers[0].descriptor.media_type == DOCKER_LAYER_GZIP
    assert img.layers[0].descriptor.digest == layer.descriptor.digest


def test_zstd_needs_oci_media_types(store: ContentStore) -> None:
    layer = make_layer(store, {"a": b"1"}, zstd=True)
    with pytest.raises(UnsupportedError, match="zstd"):
        write_image(store, base_config(1), [layer], oci_media_types=False)
    assert write_image(store, base_config(1), [layer]).layers == (layer,)


def test_annotations_need_oci_media_types(store: ContentStore) -> None:
    with pytest.raises(UnsupportedError, match="annotations"):
        write_image(store, base_config(0), [], oci_media_types=False, annotations={"a": "b"})


def test_history_must_match_layers(store: ContentStore) -> None:
    layer = make_layer(store, {"a": b"1"})
    config = base_config(2)
    with pytest.raises(UserError, match=r"2 entries that create a layer .* 1 layers"):
        write_image(store, config, [layer])
    config["history"] = [{"created_by": "ENV a=b", "empty_layer": True}, {"created_by": "RUN"}]
    img = write_image(store, config, [layer])
    assert read_image(store, img.manifest.digest)[1]["history"] == config["history"]


def test_no_history_is_fine(store: ContentStore) -> None:
    layer = make_layer(store, {"a": b"1"})
    img = write_image(store, {"os": "linux", "architecture": "amd64"}, [layer])
    assert len(img.layers) == 1


def test_missing_or_short_layer_blob(store: ContentStore) -> None:
    layer = make_layer(store, {"a": b"1"})
    ghost = Layer(
        descriptor=Descriptor(OCI_LAYER_GZIP, sha256_bytes(b"nope"), 4), diff_id=layer.diff_id
    )
    with pytest.raises(NotFoundError):
        write_image(store, base_config(1), [ghost])
    short = Layer(
        descriptor=Descriptor(OCI_LAYER_GZIP, layer.descriptor.digest, layer.descriptor.size + 1),
        diff_id=layer.diff_id,
    )
    with pytest.raises(DigestMismatchError):
        write_image(store, base_config(1), [short])


def test_load_image_round_trip(store: ContentStore) -> None:
    layers = [make_layer(store, {"a": b"1"}), make_layer(store, {"b": b"2"})]
    img = write_image(store, base_config(2), layers)
    assert load_image(store, img.manifest) == img


def test_read_image_rejects_non_manifests(store: ContentStore) -> None:
    index = store.put(b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}')
    with pytest.raises(UnsupportedError, match="not an image manifest"):
        read_image(store, index)
    not_json = store.put(b"\xff\xfe")
    with pytest.raises(UserError, match="not valid JSON"):
        read_image(store, not_json)
    with pytest.raises(NotFoundError):
        read_image(store, sha256_bytes(b"absent"))


def test_an_unchanged_image_leaves_its_stored_blobs_as_they_are(store: ContentStore) -> None:
    # A rebuild that changed nothing: the same config and manifest are already stored,
    # so they are not written (nor fsynced) again; the result is the same image.
    layer = make_layer(store, {"a": b"1"})
    first = write_image(store, base_config(1), [layer])
    blobs = [store.blob_path(d.digest) for d in (first.manifest, first.config)]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in blobs]
    again = write_image(store, base_config(1), [layer])
    assert again == first
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in blobs] == before
    # and the blobs read back as what their digests name
    assert sha256_bytes(store.read(first.manifest.digest)) == first.manifest.digest
