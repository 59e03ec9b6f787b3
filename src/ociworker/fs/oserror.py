"""An OSError in words: ``[Errno 28] No space left on device: '/x'`` is Python's
spelling; users read ``no space left on device: /x`` (as Go tools print it)."""

from __future__ import annotations

import errno
import os


def os_error_text(exc: OSError) -> str:
    if exc.errno == errno.EPIPE:
        return "the reader went away before everything was written (broken pipe)"
    reason = (exc.strerror or os.strerror(exc.errno or 0)).lower()
    if exc.filename is None:
        return reason
    # A failed rename (temp file -> dest) is about the dest, the name the user gave.
    where = exc.filename if exc.filename2 is None else exc.filename2
    return f"{reason}: {os.fsdecode(where)}"
