"""OCI image layout and ``docker load`` archives, streamed as tar.

Both archives have the layout BuildKit's oci and docker exporters write (an OCI
image layout: ``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``); the docker
one adds ``manifest.json`` and ``repositories``, which is what ``docker load``
reads. Entries are sorted by name, as containerd's archive writer does, and
blobs are copied from the content store in chunks, so ``out`` may be a pipe.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from typing import IO, BinaryIO, Protocol, cast

from ociworker.content.store import ContentStore
from ociworker.core.digest import hex_part
from ociworker.core.oci import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    OCI_INDEX,
    Descriptor,
    layer_compression,
)
from ociworker.core.reference import Reference, parse_reference
from ociworker.errors import DigestMismatchError, UnsupportedError, UserError
from ociworker.exporter.image import ImageResult


def export_oci_archive(
    store: ContentStore, image: ImageResult, names: Sequence[str], out: IO[bytes]
) -> None:
    """Write ``image`` as an OCI image layout tar; one index entry per name."""
    _write_archive(store, image, names, out, docker=False)


def export_docker_archive(
    store: ContentStore, image: ImageResult, names: Sequence[str], out: IO[bytes]
) -> None:
    """Write ``image`` as a tar that ``docker load`` accepts and tags with ``names``."""
    for layer in image.layers:
        compression = _compression(layer.descriptor)
        if compression not in ("", "gzip"):
            # Docker Engine before 23.0 cannot decompress zstd and fails half-way
            # through the load; refuse up front with something actionable.
            raise UnsupportedError(
                f"layer {layer.descriptor.digest} is {compression}-compressed; "
                "docker archives need gzip or uncompressed layers (compression=gzip)"
            )
    _write_archive(store, image, names, out, docker=True)


def _write_archive(
    store: ContentStore,
    image: ImageResult,
    names: Sequence[str],
    out: IO[bytes],
    *,
    docker: bool,
) -> None:
    full_names = [_full_name(n) for n in names]
    blobs: dict[str, Descriptor] = {}
    for desc in (image.manifest, image.config, *(la.descriptor for la in image.layers)):
        blobs.setdefault(hex_part(desc.digest), desc)
    for desc in blobs.values():
        # Fail before the first byte is written: a pipe cannot be rewound.
        size = store.size(desc.digest)
        if size != desc.size:
            raise DigestMismatchError(
                f"blob {desc.digest}: descriptor says {desc.size} bytes, store has {size}"
            )

    files: dict[str, bytes] = {
        "oci-layout": _json({"imageLayoutVersion": "1.0.0"}),
        "index.json": _json(_index(image.manifest, full_names)),
    }
    if docker:
        files["manifest.json"] = _json(_docker_manifest(image, full_names))
        files["repositories"] = _json(_repositories(image, full_names))

    entries: list[tuple[str, Descriptor | bytes | None]] = [
        ("blobs", None),
        ("blobs/sha256", None),
    ]
    entries += [(f"blobs/sha256/{h}", d) for h, d in blobs.items()]
    entries += list(files.items())
    entries.sort(key=lambda e: e[0])

    tar = _TarOut(out)
    for name, content in entries:
        if content is None:
            tar.add(_info(name, tarfile.DIRTYPE, 0o755, 0))
        elif isinstance(content, bytes):
            tar.add(_info(name, tarfile.REGTYPE, 0o644, len(content)), io.BytesIO(content))
        else:
            _add_blob(tar, store, name, content)
    tar.close()


def _add_blob(tar: _TarOut, store: ContentStore, name: str, desc: Descriptor) -> None:
    with store.open(desc.digest) as f:
        tar.add(_info(name, tarfile.REGTYPE, 0o444, desc.size), _VerifyingReader(f, desc))


class _TarOut:
    """The bytes ``tarfile.open(mode="w|", format=PAX_FORMAT)`` writes, written
    straight to ``out``: headers from ``TarInfo.tobuf``, contents through one buffer.
    tarfile's stream writer moves every blob through 16 KiB reads and a 10 KiB
    record buffer that it re-slices on each write (docs/performance.md). After an
    error nothing more is written: the archive stays cut short, as tarfile leaves it."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._offset = 0
        # one buffer for every blob, no object per chunk
        self._buf = memoryview(bytearray(_CHUNK))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def add(self, info: tarfile.TarInfo, src: _Reader | None = None) -> None:
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if src is None or not info.size:
            return
        remaining = info.size
        while remaining:
            n = src.readinto(self._buf[: min(_CHUNK, remaining)])
            if not n:
                raise DigestMismatchError(f"{info.name}: shorter than its {info.size} bytes")
            self._out.write(self._buf[:n])
            self._offset += n
            remaining -= n
        if info.size % tarfile.BLOCKSIZE:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))

    def close(self) -> None:
        # tarfile's end of archive: two zero blocks, then zeros up to a whole record
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self._offset % tarfile.RECORDSIZE:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - self._offset % tarfile.RECORDSIZE))


class _Reader(Protocol):
    def readinto(self, buf: memoryview, /) -> int: ...


#: small enough that what read() brought in is still in cache for the hash and the
#: write: 1 MiB chunks cost 0.5 s more system time per GiB than 128 KiB ones
_CHUNK = 128 * 1024


class _VerifyingReader:
    """Hashes a blob as tarfile copies it, and fails before handing over its last
    chunk if the digest is wrong, so the archive is cut short (every reader
    rejects it) instead of holding a well-formed but corrupt blob."""

    def __init__(self, f: BinaryIO, desc: Descriptor) -> None:
        self._f = f
        self._desc = desc
        self._hash = hashlib.sha256()
        self._read = 0

    def readinto(self, buf: memoryview, /) -> int:
        n = cast(io.BufferedIOBase, self._f).readinto(buf)  # BinaryIO does not declare it
        self._hash.update(buf[:n])
        self._read += n
        if self._read >= self._desc.size:
            # The store checked the digest at commit; this catches a blob
            # corrupted on disk since then, for the price of one hash pass.
            got = "sha256:" + self._hash.hexdigest()
            if got != self._desc.digest:
                raise DigestMismatchError(
                    f"blob {self._desc.digest} in the content store now hashes to {got}"
                )
        return n


def _info(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    return info


def _index(manifest: Descriptor, names: Sequence[str]) -> dict[str, object]:
    base = manifest.to_json()
    if names:
        manifests = []
        for name in names:
            d = dict(base)
            d["annotations"] = {
                **base.get("annotations", {}),
                ANNOTATION_IMAGE_NAME: name,
                ANNOTATION_REF_NAME: _oci_ref_name(name),
            }
            manifests.append(d)
    else:
        manifests = [base]
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}


def _docker_manifest(image: ImageResult, names: Sequence[str]) -> list[dict[str, object]]:
    return [
        {
            "Config": f"blobs/sha256/{hex_part(image.config.digest)}",
            "RepoTags": [_familiar(n) for n in names],
            "Layers": [f"blobs/sha256/{hex_part(la.descriptor.digest)}" for la in image.layers],
        }
    ]


def _repositories(image: ImageResult, names: Sequence[str]) -> dict[str, dict[str, str]]:
    # Only the legacy (pre-1.10) loader reads this file; docker load prefers
    # manifest.json. There are no v1 layer IDs here, so the image ID stands in.
    repos: dict[str, dict[str, str]] = {}
    for name in names:
        ref, tag = _tagged(name)
        repos.setdefault(ref.familiar_name(), {})[tag] = hex_part(image.config.digest)
    return repos


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _compression(desc: Descriptor) -> str:
    try:
        return layer_compression(desc.media_type)
    except ValueError:
        raise UnsupportedError(
            f"layer {desc.digest} has unsupported media type {desc.media_type!r}"
        ) from None


# --- image names ----------------------------------------------------------------


def _tagged(name: str) -> tuple[Reference, str]:
    ref = parse_reference(name)
    if ref.digest is not None or ref.tag is None:
        # docker load can only tag, and OCI ref.name is a tag: a digest names
        # the content itself, which the archive already does.
        raise UserError(f"cannot name an exported image by digest: {name!r}; use a tag")
    return ref, ref.tag


def _full_name(name: str) -> str:
    """``foo`` -> ``docker.io/library/foo:latest`` (the normalized form)."""
    return str(_tagged(name)[0])


def _familiar(name: str) -> str:
    """``docker.io/library/foo:latest`` -> ``foo:latest`` (what docker shows)."""
    return _tagged(name)[0].familiar()


def _oci_ref_name(name: str) -> str:
    # The OCI ref.name annotation holds only the tag; the full name goes in the
    # containerd annotation (the same split containerd and BuildKit write).
    return _tagged(name)[1]
