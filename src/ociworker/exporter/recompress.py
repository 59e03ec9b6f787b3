"""``force-compression=true``: a base image's layer re-compressed in the codec
the build asks for. The tar inside is kept byte for byte, so the diffID (and
so the config's rootfs) does not change; only the blob and its media type do."""

from __future__ import annotations

import asyncio

from ociworker.content.store import ContentStore
from ociworker.core.oci import Layer, layer_compression
from ociworker.diff.base import CompressionOpts
from ociworker.diff.tarutil import CHUNK, DECOMPRESS_ERRORS, LayerBlobWriter, decompressed
from ociworker.errors import DigestMismatchError

_CODEC = {"gzip": "gzip", "zstd": "zstd", "": "uncompressed"}


async def recompress(store: ContentStore, layer: Layer, opts: CompressionOpts) -> Layer:
    """``layer`` in ``opts.compression`` (itself when it already is)."""
    if _CODEC.get(layer_compression(layer.descriptor.media_type)) == opts.compression:
        return layer
    return await asyncio.to_thread(_recompress, store, layer, opts)


def _recompress(store: ContentStore, layer: Layer, opts: CompressionOpts) -> Layer:
    writer = LayerBlobWriter(store, opts)
    try:
        with store.open(layer.descriptor.digest) as raw:
            src = decompressed(raw, layer.descriptor.media_type)
            try:
                while chunk := src.read(CHUNK):
                    writer.write(chunk)
            except DECOMPRESS_ERRORS as exc:
                raise DigestMismatchError(
                    f"layer {layer.descriptor.digest} cannot be decompressed: {exc}"
                ) from None
    except BaseException:
        writer.abort()
        raise
    out = writer.finish()
    if out.diff_id != layer.diff_id:
        # the blob holds another tar than the config says: never ship that
        raise DigestMismatchError(
            f"layer {layer.descriptor.digest}: its tar hashes to {out.diff_id}, "
            f"the image config says {layer.diff_id}"
        )
    return out
