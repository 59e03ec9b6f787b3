"""Shared helpers for the exporter tests: tiny layers made with tarfile + gzip."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import zstandard

from ociworker.content.store import ContentStore
from ociworker.core.digest import Digest
from ociworker.core.oci import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor, Layer


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_layer(store: ContentStore, files: dict[str, bytes], *, zstd: bool = False) -> Layer:
    raw = layer_tar(files)
    if zstd:
        blob, media_type = zstandard.ZstdCompressor().compress(raw), OCI_LAYER_ZSTD
    else:
        blob, media_type = gzip.compress(raw, mtime=0), OCI_LAYER_GZIP
    digest = store.put(blob)
    return Layer(
        descriptor=Descriptor(media_type=media_type, digest=digest, size=len(blob)),
        diff_id=Digest("sha256:" + hashlib.sha256(raw).hexdigest()),
    )


def base_config(n_layers: int) -> dict[str, object]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "history": [{"created_by": f"step {i}"} for i in range(n_layers)],
    }
