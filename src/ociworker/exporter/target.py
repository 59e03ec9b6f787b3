"""Where a build's outputs are written: the ``ExportTarget`` Protocol.

The controller hands every output over through one target, so the same build
can write files next to itself (``LocalExportTarget``, the embedded worker) or
stream them to a remote client (the daemon's target), which then writes them
with the same functions this module offers:

- ``open_archive_dest(dest)``: an oci / docker / tar archive byte stream into a
  file, atomically (temp + rename, nothing left at ``dest`` on error), or
  stdout for ``-``; the file's directory must exist (buildx creates none);
- ``write_local_tar(stream, dest)``: a ``type=local`` tree sent as a tar stream
  (``exporter.fs.export_tar``) extracted into a directory with the path-safe
  applier of ``diff.apply``; it gives the same tree as ``export_local``; the
  directory and its parents are created (BuildKit's MkdirAll);
- ``write_layer(dest, layer, blob)``: one ``type=layers`` blob and descriptor.

Every method and function here blocks; async callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from ociworker.core.digest import hex_part
from ociworker.core.outputs import OutputSpec
from ociworker.core.progress import LayerCommitted
from ociworker.errors import DigestMismatchError, HostError, UserError
from ociworker.fs.atomic import create_beside, fsync_dir
from ociworker.fs.oserror import os_error_text

_CHUNK = 1 << 20


class ExportTarget(Protocol):
    """Receives a build's outputs. Methods are called from a worker thread and may
    block; ``out`` is one of the request's outputs (``req.outputs.index(out)``
    names it across a wire)."""

    def stream(self, out: OutputSpec) -> AbstractContextManager[BinaryIO]:
        """A writable byte stream for an output written as one file (an oci or
        docker image archive, a tar of the files). Leaving the block with an
        exception discards what was written: no partial file is left at the
        destination (a stream that already left just stops)."""
        ...

    def local(self, out: OutputSpec, root: Path) -> None:
        """Materialize the tree at ``root`` (the result, mounted) as a ``local``
        output: its files, modes, symlinks, mtimes, and owners when root."""
        ...

    def layer(self, out: OutputSpec, layer: LayerCommitted, blob: BinaryIO) -> None:
        """Write one committed step's layer of a ``layers`` output, read from
        ``blob``, so that its descriptor appears only once the blob is whole."""
        ...


class LocalExportTarget:
    """Writes outputs to the local filesystem (the embedded worker, and a remote
    client replaying a daemon's stream). ``stdout`` stands for ``dest=-``
    (default: this process's stdout)."""

    def __init__(self, stdout: BinaryIO | None = None) -> None:
        self._stdout = stdout

    @contextlib.contextmanager
    def stream(self, out: OutputSpec) -> Iterator[BinaryIO]:
        with output_errors(out), open_archive_dest(out.get("dest"), stdout=self._stdout) as f:
            yield f

    def local(self, out: OutputSpec, root: Path) -> None:
        # Exporters load only when a build has an output to write.
        from ociworker.exporter.fs import export_local

        # Copying the mounted tree directly skips a tar round trip; the tests
        # check it gives what write_local_tar gives a remote client.
        with output_errors(out):
            export_local(root, Path(out.get("dest")))

    def layer(self, out: OutputSpec, layer: LayerCommitted, blob: BinaryIO) -> None:
        with output_errors(out):
            write_layer(Path(out.get("dest")), layer, blob)


def output_errors(out: OutputSpec) -> AbstractContextManager[None]:
    """OSErrors while writing ``out`` as our errors (see ``write_errors``)."""
    dest = out.get("dest")
    return write_errors(
        f"cannot write output type={out.type} to " + ("stdout" if dest == "-" else dest)
    )


@contextlib.contextmanager
def write_errors(what: str) -> Iterator[None]:
    """OSErrors while writing a user's file as our errors, prefixed by ``what``:
    a full disk is the host's fault, a dest that cannot be written (not a dir,
    read-only...) the caller's."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM):
            raise HostError(f"{what}: {os_error_text(e)}") from e
        raise UserError(f"{what}: {os_error_text(e)}") from e


@contextlib.contextmanager
def open_archive_dest(dest: str, *, stdout: BinaryIO | None = None) -> Iterator[BinaryIO]:
    """A binary stream into ``dest``, which appears whole or not at all; ``-`` is
    stdout (flushed at the end; on error it just stops). The temp file is
    beside ``dest`` under a name of its own and removed on any failure (the
    build failed or was cancelled, or ``dest`` cannot be replaced). The parent
    directory must exist, as buildx's os.Create needs it: a typo in a path is an
    error, not a new directory."""
    if dest == "-":
        f = stdout if stdout is not None else sys.stdout.buffer
        yield f
        f.flush()
        return
    path = Path(dest)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with create_beside(tmp) as f:
            yield f
            # on disk before the rename, or a crash could leave a renamed but empty file
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_local_tar(stream: BinaryIO, dest: Path) -> None:
    """Extract a ``type=local`` tree sent as an uncompressed tar (``export_tar``)
    into ``dest`` (created if missing). Names that climb out, symlinked parents
    and hardlinks outside ``dest`` cannot write outside it; ``.wh.`` names are
    plain files. Existing entries that collide are replaced, others kept, as
    ``export_local`` does."""
    from ociworker.diff.apply import apply_tar_stream

    dest.mkdir(parents=True, exist_ok=True)
    apply_tar_stream(stream, dest, whiteouts=False)


def layer_file_name(layer: LayerCommitted) -> str:
    """``NNN-<hex>.json``: NNN is the step index, so sorting the names sorts the
    layers in image order."""
    return f"{layer.index:03d}-{hex_part(layer.descriptor.digest)}.json"


def write_layer(dest: Path, layer: LayerCommitted, blob: BinaryIO) -> Path:
    """Write ``blob`` to ``dest/blobs/sha256/<hex>`` and then the descriptor to
    ``dest/NNN-<hex>.json``, each through a temp name and a rename, so a watcher
    that sees a descriptor can read its whole blob. The blob is checked against
    the descriptor's digest and size before it is renamed into place."""
    desc = layer.descriptor
    if layer.index < 1:
        raise UserError(f"layer {desc.digest}: descriptor has no step index")
    hexd = hex_part(desc.digest)  # validated: it becomes a file name
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".{hexd}.{uuid.uuid4().hex}.tmp"
    try:
        h = hashlib.sha256()
        size = 0
        with open(tmp, "xb") as f:
            while chunk := blob.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        got = f"sha256:{h.hexdigest()}"
        if got != desc.digest or size != desc.size:
            raise DigestMismatchError(
                f"layer blob {desc.digest} ({desc.size} bytes) arrived as {got} ({size} bytes)"
            )
        os.replace(tmp, blobs / hexd)
        # the blob's name is durable before a descriptor can point at it
        fsync_dir(blobs)
    finally:
        tmp.unlink(missing_ok=True)
    path = dest / layer_file_name(layer)
    data = json.dumps(desc.to_json(), indent=2, sort_keys=True).encode() + b"\n"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return path
