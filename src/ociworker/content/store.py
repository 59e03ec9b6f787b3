"""Content-addressed blob store on local disk.

Commits follow containerd: write to an ingest file, fsync, verify the digest,
rename into ``blobs/sha256/<hex>``, fsync the directory. A reader never sees a
partial blob, and a blob that does not match its name is never stored.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ociworker.core.digest import Digest, check_digest, hex_part
from ociworker.errors import DigestMismatchError, NotFoundError
from ociworker.fs.atomic import fsync_dir


class Ingest:
    """An open write of one blob. Use as a context manager; call ``commit``."""

    def __init__(
        self, store: ContentStore, expected: Digest | None, expected_size: int | None
    ) -> None:
        self._store = store
        self._expected = expected
        self._expected_size = expected_size
        # named after the worker process writing it: one killed mid-write is
        # found by its owner id (``executor.owners``) and its ingests removed
        prefix = f"ingest-{store.owner}-" if store.owner else "ingest-"
        fd, name = tempfile.mkstemp(dir=store.ingest_dir, prefix=prefix)
        self._path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    @property
    def digest(self) -> Digest:
        return Digest("sha256:" + self._hash.hexdigest())

    def commit(self) -> Digest:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        got = self.digest
        if self._expected is not None and got != self._expected:
            self._discard()
            raise DigestMismatchError(f"content digest mismatch: want {self._expected}, got {got}")
        if self._expected_size is not None and self.size != self._expected_size:
            self._discard()
            raise DigestMismatchError(
                f"content size mismatch for {got}: want {self._expected_size}, got {self.size}"
            )
        final = self._store.blob_path(got)
        os.chmod(self._path, 0o444)
        os.replace(self._path, final)
        fsync_dir(final.parent)
        self._done = True
        return got

    def _discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._path.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> Ingest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self._discard()


class ContentStore:
    def __init__(self, root: Path, owner: str | None = None) -> None:
        self.root = root
        self.owner = owner
        self.blob_dir = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.ingest_dir.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / hex_part(digest)

    def has(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found in content store") from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found in content store") from None

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def ingest(self, expected: Digest | None = None, expected_size: int | None = None) -> Ingest:
        return Ingest(self, expected, expected_size)

    def put(self, data: bytes, expected: Digest | None = None) -> Digest:
        with self.ingest(expected) as w:
            w.write(data)
            return w.commit()

    def delete(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    def drop_ingests(self, owner: str) -> int:
        """Remove the unfinished writes of the dead worker process ``owner``; how many."""
        found = list(self.ingest_dir.glob(f"ingest-{owner}-*"))
        for p in found:
            p.unlink(missing_ok=True)
        return len(found)

    def walk(self) -> Iterator[tuple[Digest, int]]:
        for p in self.blob_dir.iterdir():
            yield check_digest("sha256:" + p.name), p.stat().st_size
