"""Start a real ``ociworker serve`` for tests and benchmarks (no fake: the process).

Readiness is the daemon's own "serving on" line, not the socket file: a socket
may be the stale one of a daemon that was killed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class DaemonStartError(RuntimeError):
    """The daemon exited or did not say it serves in time; carries its log's tail."""


def spawn_daemon(
    args: Sequence[str], log_path: Path, *, timeout: float = 60, python: str = sys.executable
) -> subprocess.Popen[bytes]:
    """``python -m ociworker serve ARGS`` with stdout and stderr in ``log_path``,
    returned once it serves; killed and raised on failure. ``python``: another
    interpreter (a venv with a frontend plugin installed)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, "-m", "ociworker", "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + timeout
    while b"serving on" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise DaemonStartError(f"ociworker serve did not start: {tail}")
        time.sleep(0.05)
    return proc
