"""A frontend's view of the build context: one file at a time, confined and bounded."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ociworker.errors import NotFoundError, UnsafePathError, UserError
from ociworker.fs.ignore import IgnoreMatcher
from ociworker.fs.paths import secure_join

#: the most a frontend may read of one file (``frontend.base.MAX_READ_BYTES``)
MAX_READ_BYTES = 16 << 20


class ContextFiles:
    """``frontend.base.ContextReader`` over a context directory: a path with
    ``..`` or an absolute one is refused (not clamped: a frontend asking for
    one is wrong), symlinks resolve inside the context, a file the
    ``.dockerignore`` hides is not there, and no file is read past the limit."""

    def __init__(
        self, root: Path, ignore: IgnoreMatcher | None = None, limit: int = MAX_READ_BYTES
    ) -> None:
        self._root = root
        self._ignore = ignore
        self._limit = limit

    def read(self, path: str) -> bytes:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if path.startswith("/") or ".." in parts or "\x00" in path or not parts:
            raise UnsafePathError(f"frontend read {path!r}: want a path inside the context")
        rel = "/".join(parts)
        if self._ignore is not None and self._ignore.excluded(rel):
            raise NotFoundError(f"frontend read {path!r}: excluded by .dockerignore")
        full = secure_join(self._root, rel)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFoundError(f"frontend read {path!r}: no such file in the context") from None
        except OSError as exc:
            raise UserError(f"frontend read {path!r}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"frontend read {path!r}: not a regular file")
            chunks: list[bytes] = []
            size = 0
            while size <= self._limit:
                chunk = os.read(fd, min(1 << 20, self._limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > self._limit:
            raise UserError(f"frontend read {path!r}: larger than {self._limit} bytes")
        return data
